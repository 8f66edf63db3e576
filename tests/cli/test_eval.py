"""Re-evaluating real run folders (one named as lipexp < 0.6 named them, ``adv=j2,head=tanh``):
``lipexp eval`` (lipexp.cli.eval), the evaluation task ``python evaluate.py ckpt_path=...``,
the re-evaluate command that every run prints, and the run's logger in an evaluation
(lipexp.runs.reevaluate)."""

import csv
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lipexp.cli import main
from lipexp.config.overrides import hydra_quoted

from ..helpers import REPO, run_record, summary_keys

pytestmark = pytest.mark.usefixtures("one_thread", "restore_logging")

EVAL = ["eval.n_images=12", "eval.lipschitz=false", "attacks=[l2_pgd]"]
TRAIN = ["trainer.max_epochs=2", "model.width=8", "logger=csv",
         "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", *EVAL]
# the console script `lipexp` of this environment first on PATH
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def command(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture
def restore_logging():
    """Hydra's job configures the root logger (a console handler on this test's stdout,
    which pytest closes after it): put it back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A tiny run trained by run.py in a folder named as Hydra names runs; the folder and
    what run.py printed."""
    folder = tmp_path_factory.mktemp("outputs") / "adv=j2,head=tanh,lip=lip2"
    proc = command(sys.executable, "run.py", *TRAIN, f"hydra.run.dir={hydra_quoted(str(folder))}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, proc.stdout


def evaluations(run: Path) -> set[Path]:
    return set((run / "eval").glob("*")) if (run / "eval").exists() else set()


def assert_same_evaluation(run: Path, evaluation: Path) -> None:
    """The evaluation in ``evaluation`` has the numbers of ``run``'s own: per image, and
    the median."""
    with np.load(run / "distances.npz") as a, np.load(evaluation / "distances.npz") as b:
        assert np.isfinite(a["l2_pgd"]).all() and (a["l2_pgd"] > 0).any()  # not trivial
        np.testing.assert_array_equal(a["l2_pgd"], b["l2_pgd"])
    trained = json.loads((run / "results.json").read_text())
    results = json.loads((evaluation / "results.json").read_text())
    assert results["status"] == "completed" and results["mode"] == "eval"
    assert results["attacks"]["l2_pgd"]["median"] == trained["attacks"]["l2_pgd"]["median"]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipexp eval: error: "), err
    return lines[0]


# ---------------------------------------------------------------- quoting for Hydra


@pytest.mark.parametrize("value", ["out/adv=l2,head=tanh/last.ckpt", "it's", "end\\",
                                   "a\\'b", "x${y}", "x\\${y}", "[a] {b} (c) \"d\" e:f", ""])
def test_a_hydra_quoted_value_reads_back_as_itself(value):
    (override,) = OverridesParser.create().parse_overrides([f"k={hydra_quoted(value)}"])
    assert OmegaConf.create({"k": override.value()}).k == value  # Hydra's, then OmegaConf's


# ---------------------------------------------------------------- lipexp eval


def test_lipexp_eval_of_a_run_folder_reproduces_its_evaluation_and_logs_it(trained, capsys):
    run, _ = trained
    before = evaluations(run)
    assert main(["eval", str(run), *EVAL]) == 0
    (folder,) = evaluations(run) - before  # the default: <run>/eval/<attacks>-<time>
    assert folder.name.startswith("l2_pgd-")
    assert f"Run folder: {folder}" in capsys.readouterr().out
    assert_same_evaluation(run, folder)
    results = json.loads((folder / "results.json").read_text())
    assert results["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert shlex.split(results["reevaluate"])[-4:] == [  # this evaluation, repeated
        str(run / "checkpoints" / "last.ckpt"), *EVAL]
    # the run's own logger (logger=csv), writing into the evaluation's folder
    (row,) = csv.DictReader((folder / "csv" / "version_0" / "metrics.csv").open())
    assert float(row["test/l2_pgd_median"]) == results["attacks"]["l2_pgd"]["median"]


def test_the_command_printed_at_the_end_of_training_re_evaluates_the_run(trained, tmp_path):
    run, stdout = trained
    (printed,) = [line.removeprefix("Re-evaluate: ") for line in stdout.splitlines()
                  if line.startswith("Re-evaluate: ")]
    assert json.loads((run / "results.json").read_text())["reevaluate"] == printed
    args = shlex.split(printed)
    assert args == ["lipexp", "eval", str(run)]  # the run's own settings come from the run
    before = evaluations(run)
    proc = command(*args, cwd=tmp_path)  # the console script, from anywhere
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = evaluations(run) - before
    assert folder.name.startswith("l2_pgd-")  # named by the attacks that ran: the run's
    assert_same_evaluation(run, folder)
    results = json.loads((folder / "results.json").read_text())
    assert results["reevaluate"] == shlex.join(
        ["lipexp", "eval", str(run / "checkpoints" / "last.ckpt")])
    assert results["config"]["eval"]["n_images"] == 12  # the run's, not conf/'s (all)
    assert f"Re-evaluate: {results['reevaluate']}" in proc.stdout


def test_the_printed_command_runs_where_lipexp_is_not_on_the_path(monkeypatch, tmp_path):
    """make run does not activate the virtual environment: the command then names this
    interpreter, which has lipexp installed."""
    from lipexp.config.overrides import reevaluate_command

    monkeypatch.setattr("shutil.which", lambda name: None)
    args = shlex.split(reevaluate_command(tmp_path))
    assert args == [sys.executable, "-m", "lipexp.cli", "eval", str(tmp_path.resolve())]
    proc = command(*args[:3], "--help")
    assert proc.returncode == 0 and "eval" in proc.stdout


def test_evaluate_py_evaluates_a_checkpoint_given_as_a_quoted_path(trained):
    run, _ = trained
    before = evaluations(run)
    ckpt = hydra_quoted(f"{run}/checkpoints/last.ckpt")  # Hydra's grammar: '=' and ','
    proc = command(sys.executable, "evaluate.py", f"ckpt_path={ckpt}", *EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = evaluations(run) - before
    assert_same_evaluation(run, folder)


def write_text(path: Path) -> Path:
    path.write_text("weights: none\n")
    return path


def write_foreign(path: Path) -> Path:
    torch.save({"weights": torch.ones(3)}, path)  # another program's checkpoint
    return path


def write_empty_folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "no such run folder or checkpoint file"),
    (lambda p: write_empty_folder(p / "adv=l2"), "no readable checkpoint"),
    (lambda p: write_foreign(p / "other.ckpt"), "not a lipexp checkpoint"),
    (lambda p: write_text(p / "notes.txt"), "not a PyTorch checkpoint"),
])
def test_what_is_not_a_run_or_checkpoint_gets_one_line(tmp_path, capsys, make, message):
    target = make(tmp_path)
    assert main(["eval", str(target), *EVAL]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert message in line and str(target) in line
    assert not list(tmp_path.rglob("eval"))  # no output folder made, beside or inside
    assert [p.name for p in tmp_path.iterdir()] == ([target.name] if target.exists() else [])


def test_a_folder_whose_only_checkpoint_is_damaged_gets_one_line(tmp_path, capsys):
    run = tmp_path / "adv=l2"
    write_text((run / "checkpoints").mkdir(parents=True) or run / "checkpoints" / "last.ckpt")
    assert main(["eval", str(run), *EVAL]) == 1
    err = capsys.readouterr().err
    assert "no readable checkpoint" in one_error_line(err) and "older checkpoint" not in err


@pytest.mark.parametrize("override", ["hydra.run.dir=", "hydra.run.dir=out/${oc.env:HOME}"])
def test_paths_that_hydra_would_not_take_literally_are_refused(trained, capsys, override):
    run, _ = trained
    before = evaluations(run)
    assert main(["eval", str(run), override]) == 1
    assert "is not taken" in one_error_line(capsys.readouterr().err)
    assert evaluations(run) == before


def test_the_console_entry_exits_with_1(tmp_path):
    proc = command(sys.executable, "-m", "lipexp.cli", "eval", str(tmp_path / "adv=l2,x=1"))
    assert proc.returncode == 1
    assert "adv=l2,x=1: no such run folder" in one_error_line(proc.stderr)


@pytest.mark.parametrize("override,message", [
    ("attacks=[l2_pgd,l2_pgdd]", "attacks=l2_pgdd: no such option; available options"),
    ("eval.n_images=-1", "eval.n_images must be > 0"),
    ("seed=1", "seed=1: lipexp eval overrides only eval.*, attacks"),
    ("trainer.max_epochs=3", "trainer.max_epochs=3: lipexp eval overrides only eval.*, "),
    ("logger.name=x", "logger.name=x: lipexp eval takes logger=OPTION"),
])
def test_bad_settings_are_refused_before_any_checkpoint_is_read(trained, capsys, monkeypatch,
                                                               override, message):
    run, _ = trained
    before = evaluations(run)

    def no_loading(*args, **kwargs):
        raise AssertionError("a checkpoint was read")

    monkeypatch.setattr(torch, "load", no_loading)
    assert main(["eval", str(run), override]) == 1
    assert message in one_error_line(capsys.readouterr().err)
    assert evaluations(run) == before


def test_mode_eval_logs_to_the_runs_wandb_project_as_an_evaluation(trained, tmp_path,
                                                                   monkeypatch):
    """A run that logged to W&B: its evaluation is a W&B run of its own in the same project
    and group, named as an evaluation of it, job type eval, in the evaluation's folder."""
    run, _ = trained
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["lipexp_config"]["logger"] = {
        "_target_": "lipexp.runs.loggers.WandbLogger", "project": "lipexp-test", "group": "grid",
        "name": "J2-Lip2 & tanh / small_cnn / seed 0", "tags": ["J2", "Lip2", "tanh"],
        "save_dir": str(run), "offline": False, "log_model": False, "init_timeout": 30}
    torch.save(checkpoint, tmp_path / "wandb.ckpt")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "eval=wandb,1"  # hydra.run.dir: a path taken literally
    assert main(["eval", str(tmp_path / "wandb.ckpt"), *EVAL, f"hydra.run.dir={out}"]) == 0
    record = run_record(out)
    assert record.display_name == "eval of J2-Lip2 & tanh / small_cnn / seed 0"
    assert record.project == "lipexp-test" and record.run_group == "grid"
    assert record.job_type == "eval"
    assert {"test/l2_pgd_median", "test/eval_clean_error"} <= summary_keys(out)
    assert not (run / "wandb").exists()


def test_the_evaluation_is_the_runs_own_with_this_commands_overrides(make_cfg):
    from lipexp.runs.reevaluate import evaluation_config

    run_cfg = OmegaConf.create({
        "eval": {"n_images": 12, "lipschitz": False, "batch_size": 100},
        "attacks": {"l2_pgd": {"_target_": "x.PGDSearch", "steps": 20, "factor": 2.0}}})

    def evaluation(*overrides):
        ev, attacks = evaluation_config(make_cfg(*overrides), run_cfg, list(overrides))
        return OmegaConf.to_container(ev), OmegaConf.to_container(attacks)

    ev, attacks = evaluation()  # nothing given: the run's evaluation, as it ran
    assert ev == run_cfg.eval and attacks == run_cfg.attacks
    ev, attacks = evaluation("eval.n_images=5", "attacks.l2_pgd.steps=3")
    assert ev == {"n_images": 5, "lipschitz": False, "batch_size": 100}
    assert attacks == {"l2_pgd": {"_target_": "x.PGDSearch", "steps": 3, "factor": 2.0}}
    _, attacks = evaluation("attacks=[l2_fmn]", "attacks.l2_fmn.steps=4")  # chosen anew
    assert list(attacks) == ["l2_fmn"] and attacks["l2_fmn"]["steps"] == 4
    assert evaluation("~attacks.l2_pgd")[1] == {}  # dropped
    assert evaluation("~attacks.l2_pgd.factor")[1] == {"l2_pgd": {"_target_": "x.PGDSearch",
                                                                  "steps": 20}}
    with pytest.raises(ValueError, match="the run has no attack linf_pgd"):
        evaluation("attacks.linf_pgd.steps=5")  # silently nothing, else
    run_cfg.attacks = {}  # a run evaluated with no attack: none again, not conf/'s
    assert evaluation()[1] == {}
    # an attack that conf/'s default list lacks: its value read from the override itself
    run_cfg.attacks = {"l2_gradient": {"_target_": "x.PGDSearch", "steps": 1, "rtol": 0.02}}
    _, attacks = evaluation_config(make_cfg(), run_cfg, ["attacks.l2_gradient.rtol=0.05"])
    assert attacks["l2_gradient"]["rtol"] == 0.05


def test_evaluate_py_takes_an_interpolated_checkpoint_path(trained):
    run, _ = trained
    before = evaluations(run)
    env = {**ENV, "CKPT": str(run / "checkpoints" / "last.ckpt")}
    proc = subprocess.run([sys.executable, "evaluate.py", "ckpt_path=${oc.env:CKPT}",
                           "attacks=[l2_gradient]", "eval.n_images=4"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = evaluations(run) - before
    assert folder.name.startswith("l2_gradient-")


def test_an_attack_setting_is_refused_before_any_folder_is_made(trained, capsys):
    """A setting of the run's own attack is checked by the attack's constructor, once the
    run's attacks are known: after the checkpoint is read, before any folder is made."""
    run, _ = trained
    before = evaluations(run)
    assert main(["eval", str(run), "attacks.l2_pgd.steps=0"]) == 1
    assert "steps must be >= 1, got 0" in one_error_line(capsys.readouterr().err)
    assert evaluations(run) == before


def test_evaluate_py_refuses_bad_input_before_making_a_folder(trained, tmp_path):
    run, _ = trained
    before = evaluations(run)
    ckpt = hydra_quoted(f"{run}/checkpoints/last.ckpt")
    for args in ([f"ckpt_path={ckpt}", "attacks.l2_pgd.steps=0"],
                 [f"ckpt_path={hydra_quoted(f'{tmp_path}/gone/x=1,y=2/last.ckpt')}"],
                 [f"ckpt_path={ckpt}", "attacks=[fgsm]"]):  # an old name
        proc = command(sys.executable, "evaluate.py", *args)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert evaluations(run) == before and not (tmp_path / "gone").exists()


def test_run_py_mode_eval_names_the_evaluation_task(tmp_path):
    proc = command(sys.executable, "run.py", "mode=eval", f"ckpt_path={tmp_path}/x.ckpt")
    assert proc.returncode == 1 and "evaluate.py ckpt_path=PATH" in proc.stderr
    assert list(tmp_path.iterdir()) == []
