"""The LightningModule composes any defence: all adv x lip x head combinations train."""

import itertools

import pytest
import torch
from hydra.utils import instantiate

from .helpers import build_run as build
from .helpers import trainer_on

COMBOS = list(itertools.product(["j0", "j1", "j2"], ["none", "lip1", "lip2"], ["linear", "tanh"]))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("adv,lip,head", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_combination_completes_a_fast_dev_run(make_cfg, device, adv, lip, head):
    cfg = make_cfg(f"adv={adv}", f"lip={lip}", f"head={head}", "trainer.fast_dev_run=true",
                   "logger=none", "model.width=8", *trainer_on(device))
    module, datamodule, trainer = build(cfg)
    before = [p.detach().clone() for p in module.parameters()]
    seen = set()  # the devices the network ran on (Lightning moves it back to the CPU after)
    module.net.register_forward_pre_hook(lambda m, args: seen.add(args[0].device.type))
    trainer.fit(module, datamodule=datamodule)
    assert seen == {device.type}
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert ("train/penalty" in metrics) == (lip != "none")
    if lip != "none":
        assert metrics["train/grad_norm_max"] >= metrics["train/grad_norm_mean"] > 0
        torch.testing.assert_close(metrics["train/loss"],
                                   metrics["train/ce"] + metrics["train/penalty"])
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, module.parameters()))


def test_training_step_is_the_composition_of_the_defences(make_cfg, device):
    """loss = objective(net, perturb(net, x, y), y), with the net in train mode."""
    cfg = make_cfg("adv=j2", "adv.eps=0.5", "lip=lip2", "lip.scaling=per_example")
    module, datamodule, _ = build(cfg)
    module.to(device)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    x, y = x.float().to(device), y.to(device)
    module.train()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    loss = module.training_step((x, y), 0)
    module.load_state_dict(state)  # the step updated BN running stats, which eval mode uses
    x_adv = instantiate(cfg.adv)(module.net, x, y)
    assert not torch.equal(x_adv, x)
    expected, _ = instantiate(cfg.lip)(module.net, x_adv, y)
    torch.testing.assert_close(loss, expected)
    assert module.net.training


def test_checkpoint_carries_the_config(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=none",
                   "model.width=8")
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["lipexp_config"]["lip"]["lam"] == cfg.lip.lam
    assert ckpt["lipexp_config"]["paths"]["output_dir"] == str(tmp_path / "run")


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_every_logger_records_a_run(make_cfg, logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(f"logger={logger}", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                   "trainer.log_every_n_steps=1", "model.width=8", "eval.n_images=4",
                   "attacks=[l2_pgd]", "attacks.l2_pgd.steps=2", "attacks.l2_pgd.targets=0")
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    trainer.logger.finalize("success")
    if logger == "wandb":
        import wandb

        wandb.finish()
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and (
        "metrics.csv" in p.name or "tfevents" in p.name or p.suffix == ".wandb")]
    assert written and all(p.stat().st_size > 0 for p in written)


def test_constant_learning_rate(make_cfg):
    cfg = make_cfg("scheduler=none", "trainer.fast_dev_run=true", "logger=none", "model.width=8")
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    (config,) = trainer.lr_scheduler_configs  # a real scheduler that keeps the lr as it is
    assert config.scheduler.get_last_lr() == [cfg.recipe.lr]


@pytest.mark.parametrize("override", ["attacks.l2_pgd.steps=0", "attacks.linf_pgd.targets=-1",
                                      "attacks=[linf_autoattack]"])
def test_bad_attack_settings_fail_before_training(make_cfg, override):
    extra = ["attacks.linf_autoattack.version=standart"] if "autoattack" in override else []
    with pytest.raises(Exception, match="steps|targets|version"):
        build(make_cfg(override, *extra))


def test_throughput_is_logged_and_shown(make_cfg, monkeypatch):
    """train/images_per_s = batch size / seconds between step starts (clock faked: 0.5 s)."""
    import lipexp.module as module_file

    clock = iter(range(1000))
    monkeypatch.setattr(module_file, "perf_counter", lambda: 0.5 * next(clock))
    cfg = make_cfg("trainer.max_epochs=1", "+trainer.limit_train_batches=3", "logger=none",
                   "model.width=4", "adv=j0", "lip=none", "eval.n_images=2",
                   "attacks=[l2_pgd]", "attacks.l2_pgd.steps=1", "attacks.l2_pgd.targets=0")
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    expected = cfg.data.batch_size / 0.5
    assert trainer.callback_metrics["train/images_per_s"] == pytest.approx(expected)
    assert trainer.progress_bar_metrics["train/images_per_s"] == pytest.approx(expected)
