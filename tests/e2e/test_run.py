"""End to end: run.py from the command line, results.json, resume, real MNIST files."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

from lipexp.runs.folder import RunFolderError
from lipexp.runs.train import run

from ..helpers import REPO, SHARED_DATASETS, run_py


def test_run_py_writes_results_and_checkpoints(tmp_path):
    out = tmp_path / "cli"
    proc = run_py("trainer.max_epochs=2", "trainer.enable_progress_bar=false",
                  "eval.n_images=30", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert 0.0 <= results["clean"]["error"] <= 1.0 and results["clean"]["loss"] > 0
    assert results["config"]["trainer"]["max_epochs"] == 2
    assert results["config"]["adv"]["eps"] == 0.01  # the resolved config, not the overrides
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == results["trained"]["global_step"] == 2 * 11  # the final state
    assert last["lipexp_provenance"]["torch"] == torch.__version__
    assert (out / "checkpoints" / "best.ckpt").exists()
    assert (out / ".hydra" / "config.yaml").exists()
    header = (out / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ["train/loss", "train/ce", "train/penalty", "train/grad_norm_max",
                "train/grad_norm_mean", "train/acc", "val/acc", "val/loss", "train/lr"]:
        assert key in header
    assert f"Run folder: {out}" in proc.stdout


@pytest.mark.parametrize(
    "override,message",
    # Composition and range errors; tests/config/test_config.py checks every message in-process.
    [("adv=pgd", "Available options in 'adv'"), ("lip.dual_norm=3", "lip.dual_norm must be 1")],
)
def test_run_py_refuses_bad_overrides(tmp_path, override, message):
    proc = run_py(override, f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()  # stopped before any work
    if (tmp_path / "bad" / "results.json").exists():  # the job started: failure recorded
        failed = json.loads((tmp_path / "bad" / "results.json").read_text())
        assert failed["status"] == "failed" and message in failed["error"]


def test_run_py_refuses_old_names_one_line_each(tmp_path):
    """Old scripts stop before Hydra starts, each old name told its new one on a line."""
    proc = run_py("adv=fgsm", "lip=l1", "attacks=[l2_pgd,deepfool]",
                  f"hydra.run.dir={tmp_path / 'old'}")
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == ["adv=fgsm was renamed: use adv=j1",
                                        "lip=l1 was renamed: use lip=lip1",
                                        "attacks deepfool was renamed: use l2_deepfool"]
    assert not (tmp_path / "old").exists()


def test_two_spellings_of_one_run_are_one_folder_and_one_training(tmp_path):
    """``python run.py`` and ``defence=j2_lip2 head=tanh lip.dual_norm=2`` (with the same
    tiny settings) land in one folder under outputs/, and the second finds the run completed
    (run.py started from tmp_path: its outputs/ is there)."""
    tiny = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "eval.n_images=6",
            "model.width=8", "logger=none", "attacks=[l2_pgd]", "attacks.l2_pgd.steps=3",
            "attacks.l2_pgd.targets=1", "trainer.enable_progress_bar=false"]

    def run_here(*args):
        return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    first = run_here(*tiny)
    assert first.returncode == 0, first.stderr[-3000:]
    (folder,) = (tmp_path / "outputs").iterdir()
    assert folder.name.startswith("J2-Lip2_tanh.digits.small_cnn.seed0.")
    stamp = (folder / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    again = run_here("defence=j2_lip2", "head=tanh", "lip.dual_norm=2", *reversed(tiny))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already completed" in again.stdout + again.stderr
    assert list((tmp_path / "outputs").iterdir()) == [folder]
    assert (folder / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp


def test_default_run_reaches_five_percent_error(make_cfg):
    """The main job (python run.py: digits, small CNN, J2-Lip2 & tanh, 40 epochs)."""
    results = run(make_cfg("logger=none"))
    assert results["status"] == "completed"
    assert results["clean"]["error"] <= 0.05


class CrashAtEpoch(pl.Callback):
    """Simulates a killed job: raises when ``epoch`` starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_crash_is_recorded_and_resume_continues(make_cfg, tmp_path):
    base = ["trainer.max_epochs=3", "+trainer.limit_train_batches=3", "model.width=8",
            "eval.n_images=10"]
    crash = f"+callbacks.crash={{_target_:{__name__}.CrashAtEpoch,epoch:2}}"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make_cfg(*base, crash))
    out = tmp_path / "run"
    failed = json.loads((out / "results.json").read_text())
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1

    with pytest.raises(RunFolderError, match="resume=true"):  # nothing is overwritten
        run(make_cfg(*base))
    results = run(make_cfg(*base, "resume=true"))
    assert results["status"] == "completed"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    # The resumed run trained epoch 2 only: its metrics start there, in a new log version.
    with open(out / "csv" / "version_1" / "metrics.csv") as f:
        epochs = {int(r["epoch"]) for r in csv.DictReader(f) if r["train/lr"]}
    assert epochs == {2}

    mtime = (out / "checkpoints" / "last.ckpt").stat().st_mtime
    assert run(make_cfg(*base))["status"] == "completed"  # finished: not trained again
    assert (out / "checkpoints" / "last.ckpt").stat().st_mtime == mtime


def test_resume_without_a_checkpoint_is_refused(make_cfg):
    with pytest.raises(RunFolderError, match="no .*last.ckpt"):
        run(make_cfg("resume=true"))


def test_mnist_run_reads_the_real_files(make_cfg, tmp_path):
    raw = SHARED_DATASETS / "MNIST" / "raw"
    if not raw.is_dir():
        pytest.skip(f"{raw} does not exist on this machine")
    data_dir = tmp_path / "data"
    shutil.copytree(raw, data_dir / "MNIST" / "raw")  # extraction writes beside the archives
    cfg = make_cfg("data=mnist", f"data.data_dir={data_dir}", "data.download=false",
                   "trainer.max_epochs=1", "+trainer.limit_train_batches=20",
                   "+trainer.limit_test_batches=4", "trainer.limit_val_batches=2",
                   "logger=none", "model.width=8", "eval.n_images=20")
    results = run(cfg)
    assert results["status"] == "completed"
    assert results["data"] == {"n_train": 60000, "n_test": 10000}
    assert results["attacks"]["l2_pgd"]["n_images"] == 20
    assert 0.0 <= results["clean"]["error"] <= 1.0
    assert results["config"]["data"]["source"]["_target_"] == "lipexp.data.sources.mnist"


def test_missing_data_names_folder_and_files(make_cfg, tmp_path):
    cfg = make_cfg("data=cifar10", f"data.data_dir={tmp_path / 'empty'}", "data.download=false",
                   "model=resnet34", "logger=none")
    with pytest.raises(FileNotFoundError) as info:
        run(cfg)
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in str(info.value)
    assert "data_batch_1" in str(info.value)


def test_resuming_a_trained_but_unevaluated_run_evaluates_it(make_cfg, tmp_path):
    """A run killed during its evaluation: resume=true trains nothing and evaluates."""
    base = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "model.width=8",
            "eval.n_images=8", "logger=none"]
    first = run(make_cfg(*base))
    out = tmp_path / "run"
    crashed = {k: v for k, v in first.items() if k not in ("attacks", "stability", "clean")}
    (out / "results.json").write_text(json.dumps(crashed | {"status": "failed"}))
    (out / "distances.npz").unlink()
    resumed = run(make_cfg(*base, "resume=true"))
    assert resumed["status"] == "completed"
    assert resumed["trained"] == first["trained"]
    assert resumed["attacks"] == first["attacks"]
    assert (out / "distances.npz").exists()
