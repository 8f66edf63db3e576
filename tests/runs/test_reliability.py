"""No wrong number recorded as completed, one owner per run folder, exact resume, signals
recorded as such, checkpoints that cannot run code (lipexp.runs.folder, divergence, resume,
stopping, checkpoint)."""

import hashlib
import json
import logging
import os
import pickle
import random
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lipexp.divergence import DivergenceError, DivergenceMonitor
from lipexp.errors import Interrupted, Requeued, Terminated
from lipexp.report import find_runs
from lipexp.runs.checkpoint import CheckpointError, load_run_checkpoint, load_weights
from lipexp.runs.folder import RunFolder, RunFolderError
from lipexp.runs.train import run

from ..helpers import REPO, hold_lock, run_py, signal_at

# A short seeded run: 2 epochs of 11 steps on digits, a small evaluation.
TINY = ["trainer.max_epochs=2", "model.width=8", "eval.n_images=12", "eval.lipschitz=false",
        "attacks=[l2_pgd,linf_pgd]", "eval.pictures=0", "logger=none", "trainer.deterministic=true"]


def evaluate_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "disabled"})


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def final_state(folder: Path) -> tuple[dict, dict, float]:
    """The final weights, the per-image distances and the clean test loss of a run."""
    weights = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    with np.load(folder / "distances.npz") as d:
        distances = {k: d[k] for k in d.files}
    return weights, distances, json.loads((folder / "results.json").read_text())["clean"]["loss"]


def assert_identical(a: Path, b: Path, note: str) -> None:
    (wa, da, la), (wb, db, lb) = final_state(a), final_state(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs ({note})"
    assert da.keys() == db.keys() and all(np.array_equal(da[k], db[k]) for k in da), note
    assert la == lb, note


# ---------------------------------------------------------------- divergence


def test_a_diverging_run_stops_at_the_first_non_finite_loss(make_cfg, tmp_path):
    with pytest.raises(DivergenceError) as info:
        run(make_cfg(*TINY, "optimizer.lr=1e6"))
    message = str(info.value)
    assert "non-finite loss at step" in message and "epoch 0" in message
    assert "train/ce=nan" in message and "lr 1e+06" in message and "lip.lam=0.1" in message
    out = tmp_path / "run"
    failed = json.loads((out / "results.json").read_text())  # strict: the fixture checks
    assert failed["status"] == "failed" and "DivergenceError" in failed["error"]
    assert "attacks" not in failed and "clean" not in failed
    assert not (out / "distances.npz").exists()  # nothing was evaluated


def test_patience_skips_non_finite_steps_without_touching_the_weights():
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    trainer = SimpleNamespace(global_step=7)
    monitor = DivergenceMonitor(patience=1)
    before = [p.detach().clone() for p in net.parameters()]
    for step in range(2):  # a NaN step, skipped, then a finite one
        optimizer.zero_grad()
        loss = net(torch.ones(1, 3)).sum() * (torch.nan if step == 0 else 1.0)
        monitor.on_before_backward(trainer, net, loss)
        loss.backward()
        monitor.on_before_optimizer_step(trainer, net, optimizer)
        optimizer.step()
        if step == 0:
            assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
            assert monitor.skipped == 1 and monitor.in_a_row == 1
    assert monitor.in_a_row == 0 and all(torch.isfinite(p).all() for p in net.parameters())
    with pytest.raises(ValueError, match="patience must be >= 0"):
        DivergenceMonitor(patience=-1)


def test_a_skipped_step_that_poisoned_batch_norm_stops_training():
    """The forward pass of a NaN step has already updated BatchNorm's running statistics:
    skipping the optimizer step cannot undo that, so training stops whatever the patience."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = SimpleNamespace(global_step=3, callback_metrics={}, optimizers=[optimizer],
                              current_epoch=0, lightning_module=net,
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=3)))
    monitor = DivergenceMonitor(patience=5)
    loss = net(torch.full((4, 3), torch.nan)).sum()
    monitor.on_before_backward(trainer, net, loss)
    loss.backward()
    with pytest.raises(DivergenceError, match="non-finite buffers: 1.running_mean"):
        monitor.on_before_optimizer_step(trainer, net, optimizer)


# ---------------------------------------------------------------- folder ownership and config


def test_a_folder_owned_by_a_live_process_is_refused_untouched(make_cfg, tmp_path):
    out = tmp_path / "run"
    owner = hold_lock(RunFolder(out))
    try:
        with pytest.raises(RunFolderError, match=f"in use by process {owner.pid} on "
                           f"{socket.gethostname()}"):
            run(make_cfg(*TINY))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        owner.kill()
        owner.wait()


def test_a_folder_keeps_its_config_and_an_evaluation_its_own_folder(tmp_path):
    """run.py end to end: a different config for a completed folder, and evaluate.py pointed
    at the training folder, are both refused and leave every file (.hydra/ included) as it
    was; evaluate.py by default writes <run>/eval/<attacks>-<time>/."""
    out = tmp_path / "trained"
    first = run_py(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / ".hydra" / "config.yaml").exists() and not (out / ".lock").exists()
    before = digests(out)
    assert all(os.stat(out / f).st_mode & stat.S_IRGRP for f in before)  # group-readable

    again = run_py(*TINY, "trainer.max_epochs=1", "lip.lam=0.3", f"hydra.run.dir={out}")
    assert again.returncode != 0 and "lip.lam: 0.1 -> 0.3" in again.stderr
    ckpt = out / "checkpoints" / "last.ckpt"
    into = evaluate_py(f"ckpt_path={ckpt}", f"paths.output_dir={out}")
    assert into.returncode != 0 and "holds a training run" in into.stderr
    assert digests(out) == before

    evaluated = evaluate_py(f"ckpt_path={ckpt}", "eval.n_images=12")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (folder,) = (out / "eval").iterdir()
    assert folder.name.startswith("l2_pgd+linf_pgd-")  # the run's attacks (TINY)
    results = json.loads((folder / "results.json").read_text())
    trained = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["mode"] == "eval"
    assert results["attacks"]["l2_pgd"]["median"] == trained["attacks"]["l2_pgd"]["median"]
    assert {k: v for k, v in digests(out).items() if not k.startswith("eval/")} == before


def test_resume_with_another_config_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, signal_at(3, signal.SIGINT))
    with pytest.raises(Interrupted):
        run(cfg)
    out = tmp_path / "run"
    before = digests(out)
    with pytest.raises(RunFolderError, match=r"lip.lam: 0.1 -> 0.3"):
        run(make_cfg(*TINY, "resume=true", "lip.lam=0.3"))
    assert digests(out) == before


# ---------------------------------------------------------------- signals and exact resume


@pytest.mark.parametrize("signum,step,extra", [
    (signal.SIGINT, 14, []),  # in the second epoch
    (signal.SIGTERM, 5, ["trainer.limit_train_batches=5", "trainer.max_epochs=3"]),  # its end
    (signal.SIGUSR1, 8, []),  # SLURM's warning before preemption: requeued
])
def test_a_signal_stops_after_the_step_and_resume_ends_as_uninterrupted(
        make_cfg, tmp_path, monkeypatch, signum, step, extra):
    status, error = {signal.SIGINT: ("interrupted", Interrupted),
                     signal.SIGTERM: ("terminated", Terminated),
                     signal.SIGUSR1: ("requeued", Requeued)}[signum]
    reference = tmp_path / "reference"
    run(make_cfg(*TINY, *extra, output_dir=reference))
    if signum == signal.SIGUSR1:  # a SLURM job, with a scontrol that notes its arguments
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol\n")
        (bin_dir / "scontrol").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(error, match=f"after step {step}"):
        run(make_cfg(*TINY, *extra, signal_at(step, signum)))
    out = tmp_path / "run"
    stopped = json.loads((out / "results.json").read_text())
    assert stopped["status"] == status and "resume=true continues from" in stopped["continue"]
    assert torch.load(out / "checkpoints" / "step.ckpt", weights_only=True)["global_step"] == step
    if step > 11:  # after the first epoch: its last.ckpt is kept
        assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    if signum == signal.SIGUSR1:  # requeued: the job runs again, and continues by itself
        assert (tmp_path / "scontrol").read_text().split() == ["requeue", "4242"]
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        assert run(make_cfg(*TINY, *extra))["status"] == "completed"
    else:
        assert run(make_cfg(*TINY, *extra, "resume=true"))["status"] == "completed"
    assert_identical(reference, out, f"stopped at step {step}")


def test_killed_at_a_random_step_resume_ends_bit_identical(tmp_path):
    """kill -9 (no handler runs) at a random step of a seeded run saving its state every
    step; resume=true then ends with the uninterrupted run's weights, distances and loss."""
    every_step = "callbacks.steps.every_n_train_steps=1"
    step = random.randint(2, 21)  # of 22
    reference, out = tmp_path / "reference", tmp_path / "run"
    done = run_py(*TINY, every_step, f"hydra.run.dir={reference}")
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run_py(*TINY, every_step, signal_at(step, signal.SIGKILL), f"hydra.run.dir={out}")
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((out / "results.json").read_text())["status"] == "running"
    (listed,) = [r for r in find_runs(tmp_path) if r.folder == out]
    assert listed.status == "killed" and "resume=true" in listed.message  # lipexp report
    resumed = run_py(*TINY, every_step, "resume=true", f"hydra.run.dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking over the lock" in resumed.stdout + resumed.stderr  # the dead owner's lock
    assert_identical(reference, out, f"killed at step {step}")


# ---------------------------------------------------------------- checkpoints


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_loading_refuses_code_and_names_what_is_wrong(tmp_path, make_cfg):
    evil = tmp_path / "evil.ckpt"
    torch.save({"lipexp_config": {}, "state_dict": {}, "x": RunsCode()}, evil)
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refused.*run code.*GLOBAL \w+\.system"):
        load_run_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()
    old_pickle = tmp_path / "old.ckpt"
    old_pickle.write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(CheckpointError, match="old.ckpt: "):
        load_run_checkpoint(old_pickle)

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "other.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, other)
    for path, what in [(text, "not a PyTorch checkpoint"),
                       (other, "not a lipexp checkpoint .*its keys: model")]:
        with pytest.raises(CheckpointError, match=f"{path.name}: {what}") as info:
            load_run_checkpoint(path)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.ckpt: no such checkpoint file"):
        load_run_checkpoint(tmp_path / "missing.ckpt")

    run(make_cfg(*TINY, "trainer.max_epochs=1", "+trainer.limit_train_batches=1"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.ckpt: truncated or corrupt"):
        load_run_checkpoint(truncated)
    from lipexp.runs.build import build_module

    checkpoint = load_run_checkpoint(last)
    wider = build_module(make_cfg(*TINY, "model.width=16"))
    with pytest.raises(CheckpointError, match=r"do not fit the model of its config: other shapes"):
        load_weights(wider, checkpoint)


# ---------------------------------------------------------------- bad input


def test_an_endless_run_is_refused_before_training(make_cfg):
    from lipexp.runs.build import build_module, build_trainer

    cfg = make_cfg(*TINY, "trainer.max_epochs=-1")
    with pytest.raises(ValueError, match="trainer.max_epochs=-1 trains without end"):
        build_trainer(cfg, build_module(cfg), [])
    cfg = make_cfg(*TINY, "trainer.max_epochs=-1", "+trainer.max_steps=5")
    assert build_trainer(cfg, build_module(cfg), []).max_steps == 5


def test_an_unknown_attack_in_a_list_names_the_valid_ones(tmp_path):
    proc = run_py("attacks=[l2_pgd,pgd_l2]", f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode == 1
    assert "attacks=pgd_l2: no such option" in proc.stderr and "linf_pgd" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_wandb_without_network_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    import wandb

    from lipexp.runs.loggers import WandbLogger

    # a key, and a server that refuses connections (loopback: nothing leaves the machine)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # W&B reads its settings once per process: an earlier test's stay
    logger = WandbLogger(project="p", save_dir=str(tmp_path), init_timeout=3)
    warned = logging.getLogger("lipexp.runs.loggers")
    warned.addHandler(caplog.handler)  # whatever earlier tests did to logging's propagation
    try:
        assert logger.experiment.settings.mode == "offline"
        assert "W&B cannot be reached" in caplog.text
    finally:
        warned.removeHandler(caplog.handler)
        wandb.finish()
        wandb.teardown()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("name,folder,files", [
    ("mnist", "MNIST/raw", ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    ("cifar10", "cifar-10-batches-py", [*(f"data_batch_{i}" for i in range(1, 6)),
                                        "test_batch", "batches.meta"]),
])
def test_a_corrupt_data_file_is_reported_as_corrupt_with_its_name(tmp_path, name, folder, files):
    from lipexp.data import sources

    (tmp_path / folder).mkdir(parents=True)
    for f in files:
        (tmp_path / folder / f).write_bytes(b"\x00" * 100)  # there, but damaged
    with pytest.raises(sources.DataCorruptError, match=f"{files[0]}.*corrupt|corrupt.*{files[0]}"):
        getattr(sources, name)(str(tmp_path), False)
    (tmp_path / folder / files[-1]).unlink()
    missing = sources.DataNotFoundError if name == "cifar10" else sources.DataCorruptError
    with pytest.raises(missing):  # MNIST: the damaged archives are still reported first
        getattr(sources, name)(str(tmp_path), False)


def test_slurm_jobs_get_the_requeue_signal_lightning_listens_to():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import _make_sbatch_string

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "paths.output_dir=/tmp/x"],
                      return_hydra_config=True)
    extra = OmegaConf.to_container(cfg.hydra.launcher.additional_parameters)
    sbatch = _make_sbatch_string(command="python run.py", folder="/tmp/x",
                                 additional_parameters=extra)
    assert "#SBATCH --signal=USR1@90" in sbatch and "#SBATCH --requeue" in sbatch
    assert "USR2" not in sbatch  # submitit's own signal is replaced, not sent as well
