"""Mixed precision, memory layout, torch.compile and data on the GPU: every defence trains a
step under bf16 autocast, the fd losses stay float32, and the model options build and train,
on the CPU and (pytest -m gpu) on CUDA."""

from functools import partial

import pytest
import torch
from hydra.errors import InstantiationException
from torch import nn

from lipexp.defences.adversarial import l2_gradient_step
from lipexp.defences.compose import adversarial_fd_objective, compose
from lipexp.defences.fd import fd_grad_norms
from lipexp.defences.penalty import penalized_cross_entropy

from .helpers import build_run, lip_config_of, lip_overrides, trainer_on

pytestmark = pytest.mark.usefixtures("one_thread")
DEFENCES = [(adv, lip) for adv in ("j0", "j1", "j2")
            for lip in ("none", "lip1", "lip2", "lip2-fd", "lip1-fd")]


def devices_seen(module) -> set[str]:
    """The device types the network's forward passes will have run on (Lightning moves the
    module back to the CPU after fit)."""
    seen = set()
    module.net.register_forward_pre_hook(lambda m, args: seen.add(args[0].device.type))
    return seen


@pytest.mark.parametrize("adv,lip", DEFENCES, ids=["-".join(d) for d in DEFENCES])
def test_every_defence_trains_a_step_in_bf16(make_cfg, device, adv, lip):
    cfg = make_cfg(f"adv={adv}", *lip_overrides(lip), "trainer.precision=bf16-mixed",
                   "trainer.fast_dev_run=true", "logger=none", "model.width=4",
                   *trainer_on(device))
    module, datamodule, trainer = build_run(cfg)
    before = [p.detach().clone() for p in module.parameters()]
    seen = devices_seen(module)
    trainer.fit(module, datamodule=datamodule)
    assert seen == {device.type}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, module.parameters()))


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(),
                         nn.Flatten(), nn.Linear(4 * 36, 5))


def test_fd_losses_are_float32_under_bf16_autocast(device):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    model, x, y = conv_model().to(device), x.to(device), y.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # autocast is on for the network ...
        est = fd_grad_norms(model, x, y, 2, h=0.01)
        loss, logs = adversarial_fd_objective(model, x, y, eps=0.01, clip=True, dual_norm=2,
                                              lam=0.1)
        fd = partial(penalized_cross_entropy, dual_norm=2, lam=0.1, method="fd")
        _, along_attack = compose(partial(l2_gradient_step, eps=0.01), fd, lip_config_of(fd))
        loss_a, logs_a = along_attack(model, x, y)
    # ... but not for the finite difference: network and losses in float32
    assert est.logits.dtype == est.losses.dtype == est.norms.dtype == torch.float32
    assert loss.dtype == logs["grad_norm_max"].dtype == torch.float32
    assert loss_a.dtype == logs_a["grad_norm_max"].dtype == logs_a["ce"].dtype == torch.float32
    plain = fd_grad_norms(model, x, y, 2, h=0.01)  # without autocast: the same numbers
    torch.testing.assert_close(est.norms, plain.norms)


def test_channels_last_stores_weights_and_activations_in_nhwc(make_cfg, device):
    cfg = make_cfg("+model.channels_last=true", "trainer.fast_dev_run=true", "logger=none",
                   "model.width=4", *trainer_on(device))
    module, datamodule, trainer = build_run(cfg)
    convs = [m for m in module.net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last)
                         for c in convs)
    # with one input channel both layouts coincide; with more NHWC is not NCHW
    assert all(not c.weight.is_contiguous() for c in convs if c.in_channels > 1)
    seen = []  # the input of the second convolution: 4 channels, NHWC from the first's weight
    convs[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    trainer.fit(module, datamodule=datamodule)
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last)
                        and not x.is_contiguous() and x.device.type == device.type for x in seen)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    plain, _, _ = build_run(make_cfg("model.width=4"))
    assert module.state_dict().keys() == plain.state_dict().keys()


def test_compile_with_the_exact_penalty_warns_and_trains_uncompiled(make_cfg, device):
    cfg = make_cfg("+model.compile=true", "lip=lip2", "trainer.fast_dev_run=true",
                   "logger=none", "model.width=4", *trainer_on(device))
    with pytest.warns(UserWarning, match="cannot differentiate twice"):
        module, datamodule, trainer = build_run(cfg)
    assert module.__dict__["_train_net"] is module.net
    seen = devices_seen(module)
    trainer.fit(module, datamodule=datamodule)
    assert seen == {device.type}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_compile_with_fd_compiles_the_training_network_only(make_cfg):
    cfg = make_cfg("+model.compile=true", "lip=lip2", "lip.method=fd", "model.width=4")
    with pytest.warns(UserWarning, match="penalty's passes run on the uncompiled network"):
        module, _, _ = build_run(cfg)
    compiled = module.__dict__["_train_net"]
    assert compiled is not module.net and compiled._orig_mod is module.net
    plain, _, _ = build_run(make_cfg("model.width=4"))
    assert module.state_dict().keys() == plain.state_dict().keys()  # checkpoints unchanged


@pytest.mark.slow
def test_compiled_fd_training_runs(make_cfg, device):
    cfg = make_cfg("+model.compile=true", "lip=lip2", "lip.method=fd",
                   "trainer.fast_dev_run=true", "logger=none", "model.width=4",
                   *trainer_on(device))
    module, datamodule, trainer = build_run(cfg)
    seen = devices_seen(module)
    trainer.fit(module, datamodule=datamodule)
    assert seen == {device.type}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_on_device_data_trains_from_the_gpu_or_is_refused(make_cfg, device):
    """data.on_device=true: on a GPU the training set lives there and batches come from
    there (bf16, fd penalty); with a CPU trainer there is no device to hold it on, and the
    setting is refused (without CUDA when the data module is built, with CUDA at setup)."""
    overrides = ["data.on_device=true", "trainer.precision=bf16-mixed", "lip=lip2",
                 "lip.method=fd", "trainer.fast_dev_run=true", "logger=none", "model.width=4",
                 *trainer_on(device)]
    if device.type != "cuda":  # (Hydra wraps the data module's ValueError)
        with pytest.raises((ValueError, InstantiationException), match="data.on_device=true"):
            module, datamodule, trainer = build_run(make_cfg(*overrides))
            trainer.fit(module, datamodule=datamodule)
        return
    module, datamodule, trainer = build_run(make_cfg(*overrides))
    seen = []
    module.net.register_forward_pre_hook(lambda m, args: seen.append(args[0].device.type))
    trainer.fit(module, datamodule=datamodule)
    assert datamodule._train.tensors[0].is_cuda
    assert seen and set(seen) == {"cuda"}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
