"""The tuning loop (``tune``): each trial launched as its own ``python run.py -m`` (the
launcher its overrides choose), ``jobs`` at a time, its run's results told to the study;
trials under way stopped and requeued when the loop is interrupted."""

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipexp.config.overrides import hydra_quoted
from lipexp.files import atomic_path
from lipexp.runs.folder import RunFolder, alive, read_results
from lipexp.tune.spec import (
    METRICS,
    RUN_PY,
    SPEC_FILE,
    TRIAL_LOGS,
    TuneError,
    TuneSpec,
    first_params,
    metrics,
    override_value,
    run_folder,
    search_space,
    trial_overrides,
)
from lipexp.tune.study import counted, open_study, requeue


@dataclass
class TrialLaunch:
    """What starting a trial needs: its number, run-config overrides, run folder, console log
    file, and the command (``python run.py -m ...``)."""

    number: int
    overrides: list[str]
    folder: Path
    log: Path
    command: list[str]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the trial when the tune process dies (SIGKILL included), so that a
    killed tune leaves no run training without it; the run stops after its step and saves
    checkpoints/step.ckpt, which the restart's trial continues."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_trial(launch: TrialLaunch) -> subprocess.Popen:
    """Start ``launch.command`` with its console output in ``launch.log``."""
    launch.log.parent.mkdir(parents=True, exist_ok=True)
    with open(launch.log, "ab") as log:
        return subprocess.Popen(launch.command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)


@dataclass
class _Flight:
    trial: Any  # optuna.trial.Trial
    launch: TrialLaunch
    process: Any  # subprocess.Popen, or anything with poll() and returncode


def _describe(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={override_value(v)}"
                    for k, v in params.items())


def _number(value: float | None) -> str:
    return "—" if value is None else "inf" if math.isinf(value) else f"{value:.4g}"


def tune(spec: TuneSpec, *, launch: Callable[[TrialLaunch], Any] = start_trial,
         echo: Callable[[str], None] = print, poll_s: float = 0.5) -> dict[str, Any]:
    """Run the study of ``spec`` until it holds ``spec.n_trials`` finished trials, ``spec.jobs``
    at a time (``launch`` starts one: default ``start_trial``, a subprocess). Returns
    ``{"folder", "storage", "started": [trial numbers run now], "finished", "lost"}``.

    On an exception (Ctrl-C included) the trials under way are stopped (SIGINT: each run
    saves its state) and requeued, then the exception propagates: the same command again
    continues them."""
    from optuna.trial import TrialState

    space = search_space(spec.params)
    run_folder(spec, trial_overrides(spec, first_params(space)))  # composes, or TuneError now
    spec.folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(spec.folder / SPEC_FILE) as tmp:
        import yaml

        tmp.write_text(yaml.safe_dump(spec.record(), sort_keys=False))
    study = open_study(spec)
    host = socket.gethostname()
    lost, elsewhere = [], []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") == host and isinstance(pid, int) and not alive(pid):
            lost.append(trial)
        else:
            elsewhere.append(trial)
    for trial in lost:
        requeue(study, trial)
    finished = sum(counted(t) for t in study.get_trials(deepcopy=False))
    remaining = max(0, spec.n_trials - finished - len(elsewhere))
    echo(f"study {spec.name} ({spec.storage_url}): {finished} of {spec.n_trials} trials "
         f"finished" + (f"; {len(lost)} lost (trial {', '.join(str(t.number) for t in lost)}: "
                        "its tune process ended), asked again" if lost else "")
         + (f"; {len(elsewhere)} running in another process" if elsewhere else "")
         + (f"; running {remaining} more" if remaining else "; nothing to run"))
    running: dict[int, _Flight] = {}
    started: list[int] = []
    try:
        while remaining or running:
            while remaining and len(running) < spec.jobs:
                flight = _start(study, space, spec, launch, host)
                remaining -= 1
                if flight is None:
                    continue
                running[flight.trial.number] = flight
                started.append(flight.trial.number)
                echo(f"trial {flight.trial.number}: {_describe(flight.trial.params)} -> "
                     f"{flight.launch.folder} (log: {flight.launch.log})")
            done = [n for n, f in running.items() if f.process.poll() is not None]
            if not done:
                time.sleep(poll_s)
            for number in done:
                echo(_finish(study, spec, running.pop(number)))
    except BaseException:
        _stop(running)
        for flight in running.values():
            requeue(study, flight.trial)
        raise
    return {"folder": str(spec.folder), "storage": spec.storage_url, "started": started,
            "finished": sum(counted(t) for t in study.get_trials(deepcopy=False)),
            "lost": [t.number for t in lost]}


def _start(study, space, spec: TuneSpec, launch: Callable[[TrialLaunch], Any],
           host: str) -> _Flight | None:
    """Ask for a trial and launch its run (None: its config did not compose: failed)."""
    from optuna.trial import TrialState

    trial = study.ask(space)
    trial.set_user_attr("host", host)
    trial.set_user_attr("pid", os.getpid())
    overrides = trial_overrides(spec, trial.params)
    trial.set_user_attr("overrides", overrides)
    try:
        folder = run_folder(spec, overrides)
    except TuneError as e:
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        return None
    trial.set_user_attr("run_folder", folder.name)
    resume = ((read_results(folder / "results.json") or {}).get("status") != "completed"
              and bool(RunFolder(folder).checkpoints()))
    deadline = time.monotonic() + 120  # a stopped run of a lost trial may still be saving
    while RunFolder(folder).busy() and time.monotonic() < deadline:
        time.sleep(0.5)
    command = [sys.executable, str(RUN_PY), "-m", *overrides, *(["resume=true"] if resume else []),
               f"hydra.sweep.dir={hydra_quoted(str(spec.folder.resolve()))}",
               *spec.hydra_overrides]
    log = spec.folder / TRIAL_LOGS / f"trial_{trial.number:04d}.log"
    job = TrialLaunch(trial.number, overrides, folder, log, command)
    return _Flight(trial, job, launch(job))


def _finish(study, spec: TuneSpec, flight: _Flight) -> str:
    """Tell the study how a trial's run ended; the console line saying so."""
    from optuna.trial import TrialState

    trial, folder = flight.trial, flight.launch.folder
    results = read_results(folder / "results.json") or {}
    status = results.get("status")
    found = metrics(results) if status == "completed" else {}
    for name, value in found.items():
        trial.set_user_attr(name, value)
    values = [found.get(o) for o in spec.objectives]
    head = f"trial {trial.number}: "
    unbroken = [o for o, v in zip(spec.objectives, values) if v is not None and math.isinf(v)]
    if status == "completed" and None not in values and not unbroken:
        if spec.clean_error_cap is not None:
            excess = found["clean_error"] - spec.clean_error_cap  # feasible: <= 0
            trial.set_user_attr("constraint", [excess])
            if hasattr(trial, "set_constraint"):
                trial.set_constraint("clean_error_cap", excess)
        study.tell(trial, values)
        return head + ", ".join(f"{METRICS[n].label} {_number(found[n])}"
                                for n in ("clean_error", "l2_median")) + f" ({folder.name})"
    if status == "completed" and unbroken:
        # Not told as a value: Optuna's multi-objective TPE (3.x) turns an infinite value into
        # NaN weights and fails, and an unbroken median is no number to rank a defence by.
        error = (f"{', '.join(unbroken)} is infinite: more than half the evaluated images "
                 "withstood every attack; no number to tune on (read the run's checks for "
                 "gradient masking, or let the attacks search larger sizes)")
    elif status == "completed":
        error = (f"results.json has no {[o for o, v in zip(spec.objectives, values) if v is None]}"
                 " (the evaluation needs an attack of that norm)")
    elif status is not None:
        error = f"run {status}: {' '.join(str(results.get('error', '')).split())[:500]}"
    else:
        error = (f"run.py exited with status {flight.process.returncode} without a results.json "
                 f"in {folder}: {_tail(flight.launch.log)}")
    trial.set_user_attr("error", error)
    study.tell(trial, state=TrialState.FAIL)
    return head + f"failed: {error} (log: {flight.launch.log})"


def _tail(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"


def _stop(running: Mapping[int, _Flight], timeout_s: float = 120.0) -> None:
    """Stop the trials under way: SIGINT (a run saves its state after the step), then wait;
    a second Ctrl-C, or ``timeout_s``, kills them."""
    for flight in running.values():
        if flight.process.poll() is None and hasattr(flight.process, "send_signal"):
            flight.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    try:
        while any(f.process.poll() is None for f in running.values()):
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.2)
    except (KeyboardInterrupt, TimeoutError):
        for flight in running.values():
            if flight.process.poll() is None and hasattr(flight.process, "kill"):
                flight.process.kill()
