"""Sweeps: the defence grid as a Hydra multirun, the report built from it, failures recorded,
finished runs skipped, and W&B offline runs."""

import csv
import json
import os
import subprocess
import sys

import pytest

from lipexp.config.identity import run_name
from lipexp.config.naming import STUDY_ORDER, defence_name
from lipexp.report import report

from ..helpers import REPO, run_record, summary_keys

TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "eval.n_images=6", "attacks=[l2_pgd,linf_pgd]", "eval.pictures=0",
        "attacks.l2_pgd.steps=3", "attacks.l2_pgd.targets=1",
        "attacks.linf_pgd.steps=3", "attacks.linf_pgd.targets=1", "model.width=8",
        "trainer.enable_progress_bar=false", "logger=none"]


def multirun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled",
                                                       **(env or {})})


@pytest.fixture(scope="module")
def digits_grid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits_grid")
    proc = multirun("+sweeps=digits_grid", *TINY, f"hydra.sweep.dir={folder}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, proc


def test_digits_grid_report_has_one_row_per_defence(digits_grid):
    folder, _ = digits_grid
    runs = [json.loads(p.read_text()) for p in folder.rglob("results.json")]
    assert len(runs) == 14 and all(r["status"] == "completed" for r in runs)
    for path in folder.rglob("results.json"):  # each job's folder: the name of its run
        assert path.parent.parent == folder
        assert path.parent.name == run_name(json.loads(path.read_text())["config"])
    summary = report(folder)
    assert summary["failed"] == [] and summary["unfinished"] == []
    with open(summary["files"]["adversarial_csv"]) as f:
        rows = list(csv.DictReader(f))
    names = [r["defence"] for r in rows]
    study = [f"{d}{h}" for d in ("J0", "J0-Lip1", "J0-Lip2", "J1", "J1-Lip1", "J2", "J2-Lip2")
             for h in ("", " & tanh")]
    assert sorted(names) == sorted(study)
    assert set(study) <= set(STUDY_ORDER)
    # The table's numbers are the runs' own.
    by_name = {r["defence"]: r for r in rows}
    for run in runs:
        row = by_name[defence_name(run["config"])]
        assert float(row["clean_error_mean"]) == pytest.approx(run["clean"]["error"])
        assert float(row["l2_median_mean"]) == pytest.approx(run["attacks"]["l2_pgd"]["median"])
    markdown = (folder / "report.md").read_text()
    assert "J2-Lip2 & tanh" in markdown and "**" in markdown
    assert all(os.path.getsize(p) > 0 for p in summary["files"]["figures"])


def test_rerunning_a_finished_sweep_trains_nothing(digits_grid):
    folder, _ = digits_grid
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.ckpt")}
    assert len(stamps) >= 14
    proc = multirun("+sweeps=digits_grid", *TINY, f"hydra.sweep.dir={folder}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("already completed") + proc.stdout.count("already completed") == 14
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.ckpt")} == stamps


def test_a_command_line_defence_sweep_runs_each_defence(tmp_path):
    """``-m defence=j0,j2_lip2`` (no "+": defence is in the defaults list): one job, and
    one folder, per defence."""
    proc = multirun("defence=j0,j2_lip2", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.rglob("results.json")}
    assert sorted(defence_name(r["config"]) for r in runs.values()) == ["J0 & tanh",
                                                                        "J2-Lip2 & tanh"]
    assert all(name == run_name(r["config"]) for name, r in runs.items())


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    proc = multirun("adv.eps=0.01,-1", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode != 0  # Hydra reports the failure at the end of the sweep
    status = {json.loads(p.read_text())["config"]["adv"]["eps"]: json.loads(p.read_text())
              for p in tmp_path.rglob("results.json")}
    assert status[0.01]["status"] == "completed"
    assert status[-1]["status"] == "failed" and "adv.eps must be >= 0" in status[-1]["error"]
    summary = report(tmp_path)
    assert len(summary["failed"]) == 1
    assert "failed" in (tmp_path / "report.md").read_text()


def test_wandb_offline_run_holds_the_evaluation(tmp_path):
    proc = subprocess.run(
        [sys.executable, "run.py", *TINY[:-1], "logger=wandb", "name=test_sweep",
         "trainer.log_every_n_steps=1",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = summary_keys(tmp_path)
    for key in ["test/l2_pgd_median", "test/linf_pgd_median", "test/l2_pgd_error@0.1",
                "test/eval_clean_error", "test/grad_loss_l2_max", "test/jac_2_inf_max",
                "test/error_curves/_type", "test/error_curves_plot/_type", "train/penalty"]:
        assert key in keys, key
    run = run_record(tmp_path)
    assert run.display_name == "J2-Lip2 & tanh / small_cnn / seed 0"
    assert run.run_group == "test_sweep" and list(run.tags) == ["J2", "Lip2", "tanh"]


SWEEPS = sorted(p.stem for p in (REPO / "conf" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_configs_compose_and_match_their_wandb_twins(make_cfg, sweep):
    import yaml

    from lipexp.config.schema import validate

    for defence in ("j0", "j1_lip1", "j2_lip2"):
        cfg = make_cfg(f"+sweeps={sweep}", f"defence={defence}", "head=tanh")
        validate(cfg)
        assert cfg.name == sweep
    wandb_sweep = yaml.safe_load((REPO / "sweeps" / "wandb" / f"{sweep}.yaml").read_text())
    hydra_sweep = yaml.safe_load((REPO / "conf" / "sweeps" / f"{sweep}.yaml").read_text())
    grid = hydra_sweep["hydra"]["sweeper"]["params"]
    params = wandb_sweep["parameters"]
    assert params["defence"]["values"] == grid["defence"].split(",")  # no "+": a default
    assert params["head"]["values"] == grid["head"].split(",")
    assert params["name"]["value"] == sweep
    if sweep.startswith("paper_"):
        assert params["experiment"]["value"] == sweep.removeprefix("paper_")
