"""Robustness-aware tuning (``lipexp tune``, lipexp.tune, lipexp.report.pareto): a real
4-trial study on digits killed after 2 trials and restarted, and the study's logic (search
space, resume, lost and failed trials, the cap, the front) with a stub run in place of
training."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from lipexp.report.pareto import FIGURE, LISTING, TABLE, pareto_front, pareto_section
from lipexp.tune.spec import TuneError, load_spec, metrics, search_space
from lipexp.tune.study import read_study
from lipexp.tune.trials import TrialLaunch, tune

from ..helpers import REPO

SWEEP = REPO / "sweeps" / "tune_digits.yaml"
# A trial in seconds: 2 epochs of digits, 50 attacked images, one small attack.
TINY = ["recipe.epochs=2", "eval.n_images=50", "model.width=8", "attacks=[l2_pgd]",
        "attacks.l2_pgd.steps=3", "attacks.l2_pgd.targets=1", "eval.lipschitz=false",
        "eval.pictures=0", "eval.progress=false", "trainer.enable_progress_bar=false",
        "logger=none"]


def load_optuna_study(folder):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="tune_digits", storage=f"sqlite:///{folder}/study.db")


def complete(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(states=(TrialState.COMPLETE,))


# --- the real thing -------------------------------------------------------------------------


def test_a_killed_tune_restarts_with_only_the_missing_trials(tmp_path):
    """``lipexp tune`` with 4 trials, killed (SIGKILL, with its run) once 2 are complete, then
    run again: it runs 2 trials (the lost one's parameters first), ends with 4 complete
    trials in 4 run folders and the report's Pareto front; a third start runs nothing."""
    folder = tmp_path / "tune"
    command = [sys.executable, "-m", "lipexp.cli", "tune", str(SWEEP), *TINY,
               f"hydra.sweep.dir={folder}", "--n-trials", "4"]
    # one torch thread per trial: two threads on a shared 2-core machine are several times slower
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if (folder / "study.db").exists() and len(complete(load_optuna_study(folder))) >= 2:
                break
            time.sleep(0.5)
        assert first.poll() is None, first.communicate()[0][-3000:]  # not done: killed below
        assert len(complete(load_optuna_study(folder))) == 2
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the tune and the trial it was running
        output = first.communicate()[0]
    assert "0 of 4 trials finished; running 4 more" in output

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=400)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "2 of 4 trials finished" in again.stdout and "running 2 more" in again.stdout
    started = re.findall(r"^trial (\d+): \S+=.* -> ", again.stdout, re.M)
    assert len(started) == 2, again.stdout

    study = load_optuna_study(folder)
    done = complete(study)
    assert len(done) == 4
    runs = {t.user_attrs["run_folder"] for t in done}
    assert len(runs) == 4  # four parameter sets, four ordinary run folders
    for name in runs:
        results = json.loads((folder / name / "results.json").read_text())
        assert results["status"] == "completed"
        trial = next(t for t in done if t.user_attrs["run_folder"] == name)
        assert trial.values == [pytest.approx(results["clean"]["error"]),
                                pytest.approx(results["ensemble"]["l2"]["median"])]
        assert results["config"]["lip"]["lam"] == pytest.approx(trial.params["lip.lam"])
    lost = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(lost) <= 1 and all("error" not in t.user_attrs for t in lost)
    assert [t.user_attrs.get("rerun_of") for t in done if "rerun_of" in t.user_attrs] == \
        [t.number for t in lost]  # the lost trial's parameters, asked again

    assert (folder / FIGURE).stat().st_size > 0
    listing = (folder / LISTING).read_text()
    assert sum(name in listing for name in runs) >= 1
    assert "## Tuning: Pareto front" in (folder / "report.md").read_text()
    assert f"{folder / FIGURE}" in again.stdout

    third = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "4 of 4 trials finished; nothing to run" in third.stdout
    assert len(load_optuna_study(folder).trials) == len(study.trials)


# --- the study's logic, with a stub run -----------------------------------------------------


def stub_results(overrides: list[str]) -> dict:
    """A run's results.json as a made-up function of lip.lam and adv.eps: a larger penalty
    costs clean error and buys distance; ``adv.eps=0.0999...`` fails; ``seed=99`` leaves more
    than half the images unbroken (the median null, as results.json writes +inf)."""
    values = dict(o.split("=", 1) for o in overrides)
    lam, eps = float(values["lip.lam"]), float(values["adv.eps"])
    if eps > 0.099:
        return {"status": "failed", "error": "ValueError: made up"}
    median = None if values.get("seed") == "99" else 0.2 + lam + eps
    return {"status": "completed", "clean": {"error": 0.02 + 0.1 * lam},
            "ensemble": {"l2": {"median": median}, "linf": {"median": None}}}


class StubLaunch:
    """A ``launch`` for ``tune`` that writes the stub results into the trial's folder at once;
    ``interrupt_at``: the trial number whose process raises KeyboardInterrupt when polled."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.launched: list[TrialLaunch] = []
        self.interrupt_at = interrupt_at

    def __call__(self, launch: TrialLaunch):
        self.launched.append(launch)
        assert launch.command[1:3] == [str(REPO / "run.py"), "-m"]
        assert any(c.startswith("hydra.sweep.dir=") for c in launch.command)
        if launch.number == self.interrupt_at:
            calls = []

            def poll():
                calls.append(1)
                if len(calls) == 1:
                    raise KeyboardInterrupt
                return 0
            return SimpleNamespace(poll=poll, returncode=0)
        launch.folder.mkdir(parents=True, exist_ok=True)
        (launch.folder / "results.json").write_text(json.dumps(stub_results(launch.overrides)))
        return SimpleNamespace(poll=lambda: 0, returncode=0)


def spec_for(folder, *extra, n_trials=3, sweep=SWEEP):
    return load_spec(sweep, [*TINY, f"hydra.sweep.dir={folder}", *extra], n_trials=n_trials)


def test_the_sweep_file_and_the_command_line_make_the_search_space(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    spec = spec_for(tmp_path, "lip.lam=0.3", "optimizer.lr=tag(log, interval(0.02, 0.5))",
                    "head=linear,tanh", "model.width=range(4, 17, 4)", "hydra/launcher=joblib",
                    "name=mine")
    assert spec.name == "mine" and spec.folder == tmp_path
    space = search_space(spec.params)
    assert set(space) == {"adv.eps", "optimizer.lr", "head", "model.width"}  # lip.lam fixed
    assert space["adv.eps"] == FloatDistribution(0.0, 0.1)
    assert space["optimizer.lr"] == FloatDistribution(0.02, 0.5, log=True)
    assert space["head"] == CategoricalDistribution(["linear", "tanh"])
    assert space["model.width"] == IntDistribution(4, 16, step=4)
    assert "lip.lam=0.3" in spec.overrides and "defence=j2_lip2" in spec.overrides
    assert spec.hydra_overrides == ["hydra/launcher=joblib"]
    assert spec.directions == ["minimize", "maximize"]
    capped = load_spec(REPO / "sweeps" / "tune_digits_capped.yaml")
    assert capped.objectives == ["l2_median"] and capped.clean_error_cap == 0.08
    assert capped.directions == ["maximize"] and capped.folder.name == "tune_digits_capped"


@pytest.mark.parametrize("text, error", [
    ("params: {lip.lam: 0.1}\n", "not a search space"),
    ("params: {lip.lam: 'interval(0.1'}\n", "does not parse"),
    ("objectives: [clean_error, accuracy]\nparams: {lip.lam: 'interval(0.0, 1.0)'}\n",
     "objectives"),
    ("clean_error_cap: 5\nparams: {lip.lam: 'interval(0.0, 1.0)'}\n", "clean_error_cap"),
    ("trials: 3\n", "unknown keys"),
    ("name: x\n", "no parameter to tune"),
])
def test_a_bad_sweep_file_is_refused_in_one_line(tmp_path, text, error):
    path = tmp_path / "tune_bad.yaml"
    path.write_text(text)
    with pytest.raises(TuneError, match=error):
        load_spec(path)


def test_a_bad_override_is_refused_before_the_study_starts(tmp_path):
    spec = spec_for(tmp_path, "lip.no_such_key=1")
    with pytest.raises(TuneError, match="does not compose"):
        tune(spec, launch=StubLaunch(), echo=lambda line: None)
    assert not (tmp_path / "study.db").exists()


def test_a_restart_runs_only_the_missing_trials_and_asks_lost_ones_again(tmp_path):
    lines: list[str] = []
    launch = StubLaunch()
    summary = tune(spec_for(tmp_path, n_trials=3), launch=launch, echo=lines.append)
    assert summary["started"] == [0, 1, 2] and summary["finished"] == 3
    assert "0 of 3 trials finished; running 3 more" in lines[0]
    study = load_optuna_study(tmp_path)
    for trial in study.trials:  # each trial: its ordinary run folder, its numbers
        assert (tmp_path / trial.user_attrs["run_folder"]).is_dir()
        assert trial.values == [pytest.approx(trial.user_attrs["clean_error"]),
                                pytest.approx(trial.user_attrs["l2_median"])]

    # A trial left RUNNING by a tune process of this host that is gone: lost.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask(search_space(spec_for(tmp_path).params))
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", dead.pid)
    lines.clear()
    summary = tune(spec_for(tmp_path, n_trials=5), launch=launch, echo=lines.append)
    assert f"3 of 5 trials finished; 1 lost (trial {trial.number}" in lines[0]
    assert "running 2 more" in lines[0]
    assert summary["started"] == [4, 5] and summary["lost"] == [3]
    study = load_optuna_study(tmp_path)
    rerun = study.trials[4]
    assert rerun.user_attrs["rerun_of"] == 3 and rerun.params == trial.params
    assert study.trials[3].state.name == "FAIL" and "error" not in study.trials[3].user_attrs
    assert len(complete(study)) == 5

    lines.clear()
    summary = tune(spec_for(tmp_path, n_trials=5), launch=launch, echo=lines.append)
    assert summary["started"] == [] and "5 of 5 trials finished; nothing to run" in lines[0]


def test_an_interrupted_tune_asks_its_running_trial_again(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        tune(spec_for(tmp_path, n_trials=2), launch=StubLaunch(interrupt_at=0),
             echo=lambda line: None)
    study = load_optuna_study(tmp_path)
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert study.trials[1].user_attrs == {"rerun_of": 0}
    summary = tune(spec_for(tmp_path, n_trials=2), launch=StubLaunch(), echo=lambda line: None)
    assert summary["started"] == [1, 2]
    study = load_optuna_study(tmp_path)
    assert study.trials[1].params == study.trials[0].params
    assert len(complete(study)) == 2


def test_a_failed_run_is_a_failed_trial_that_counts(tmp_path):
    spec = spec_for(tmp_path, "adv.eps=interval(0.0995, 0.1)", n_trials=2)
    lines: list[str] = []
    summary = tune(spec, launch=StubLaunch(), echo=lines.append)
    assert summary["finished"] == 2
    assert all("failed: run failed: ValueError: made up" in line for line in lines[2::2])
    study = load_optuna_study(tmp_path)
    assert all(t.state.name == "FAIL" and "made up" in t.user_attrs["error"]
               for t in study.trials)
    assert "No completed trial yet." in pareto_section(tmp_path)


def test_an_unbroken_median_is_a_failed_trial_not_an_infinite_value(tmp_path):
    """Optuna 3's multi-objective TPE fails on an infinite value (NaN weights): such a trial
    is failed with the reason, its median kept as an attribute, and the study goes on."""
    spec = spec_for(tmp_path, "seed=99", n_trials=3)
    lines: list[str] = []
    summary = tune(spec, launch=StubLaunch(), echo=lines.append)
    assert summary["finished"] == 3
    study = load_optuna_study(tmp_path)
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3
    assert all(t.user_attrs["l2_median"] == math.inf and
               "l2_median is infinite" in t.user_attrs["error"] for t in study.trials)
    assert sum("more than half the evaluated images withstood" in line for line in lines) == 3


def test_a_capped_single_objective_study_and_its_front(tmp_path):
    """One objective (the median, up) with a cap on the clean error: trials above it are
    infeasible for Optuna and left off the front; the report draws and lists the front."""
    spec = load_spec(REPO / "sweeps" / "tune_digits_capped.yaml",
                     [*TINY, f"hydra.sweep.dir={tmp_path}", "name=tune_digits"], n_trials=6)
    spec.clean_error_cap = 0.07  # lam <= 0.5 is within it (stub: 0.02 + 0.1 lam)
    tune(spec, launch=StubLaunch(), echo=lambda line: None)
    study = load_optuna_study(tmp_path)
    assert study.directions[0].name == "MAXIMIZE" and len(complete(study)) == 6
    for t in study.trials:
        excess = t.user_attrs["clean_error"] - 0.07
        assert t.user_attrs["constraint"] == [pytest.approx(excess)]
    feasible = [t for t in study.trials if t.user_attrs["clean_error"] <= 0.07]
    lines = pareto_section(tmp_path)
    assert (tmp_path / FIGURE).stat().st_size > 0
    table = (tmp_path / TABLE).read_text().splitlines()
    assert len(table) == 7 and table[0].startswith("trial,state,run_folder,lip.lam,adv.eps")
    text = "\n".join(lines)
    assert "clean test error at most 7.00%" in text
    on_front = [t for t in study.trials if t.user_attrs["run_folder"] in text]
    assert on_front and all(t in feasible for t in on_front)
    best = max(feasible, key=lambda t: t.values[0]) if feasible else None
    assert best is None or best.user_attrs["run_folder"] in text
    record = read_study(tmp_path)
    assert record["objectives"] == ["l2_median"] and record["params"] == ["lip.lam", "adv.eps"]


def test_the_pareto_front_is_the_non_dominated_points():
    points = [(0.10, 0.5), (0.05, 0.3), (0.10, 0.4), (0.20, 0.5), (0.02, 0.1), (0.05, 0.3),
              (0.30, math.inf)]
    assert pareto_front(points) == [4, 1, 5, 0, 6]  # equal points are both on it
    assert pareto_front([]) == []


def test_metrics_of_a_results_json():
    found = metrics({"status": "completed", "clean": {"error": 0.1},
                     "ensemble": {"l2": {"median": None}, "linf": {"median": 0.03}}})
    assert found == {"clean_error": 0.1, "l2_median": math.inf, "linf_median": 0.03}
    assert metrics({"clean": {"error": 0.1}})["l2_median"] is None  # no evaluation at all


def test_a_folder_without_a_study_has_no_tuning_section(tmp_path):
    assert pareto_section(tmp_path) == []


def test_jobs_trials_run_at_once(tmp_path):
    """``jobs=2``: two trials under way before either ends, then a third as one ends."""
    events: list[str] = []
    stub = StubLaunch()

    def launch(job: TrialLaunch):
        stub(job)
        events.append(f"start {job.number}")
        polls = []

        def poll():
            polls.append(1)
            if len(polls) < 2:
                return None
            if len(polls) == 2:
                events.append(f"end {job.number}")
            return 0
        return SimpleNamespace(poll=poll, returncode=0)

    spec = spec_for(tmp_path, n_trials=3)
    spec.jobs = 2
    summary = tune(spec, launch=launch, echo=lambda line: None, poll_s=0.01)
    assert summary["started"] == [0, 1, 2] and summary["finished"] == 3
    assert events[:2] == ["start 0", "start 1"] and events.index("start 2") > 2
