"""Robustness-aware tuning (``lipexp tune SWEEP_FILE``, docs/tuning.md): an Optuna study whose
trials are ordinary lipexp runs.

A sweep file (sweeps/tune_*.yaml) names the search space (``params``, in the syntax of Hydra's
Optuna sweeper: ``tag(log, interval(0.01, 1.0))``, ``interval(0.0, 0.1)``, ``choice(a, b)``,
``range(1, 5)``), the objectives (``clean_error`` down, ``l2_median`` up: the best-known
median l2 distance, results.json's ``ensemble.l2.median``; or one objective with a
``clean_error_cap``), ``n_trials`` and every trial's fixed ``overrides``. The study lives in
``<sweep folder>/study.db`` (SQLite); each trial is ``python run.py -m <overrides> <its
parameters> hydra.sweep.dir=<sweep folder>``, so it is a run like any other: its folder
``<sweep folder>/<run name>/`` with results.json (a finished run is answered from its folder),
its W&B run with ``logger=wandb``, launched by the Hydra launcher the overrides choose
(``hydra/launcher=slurm``: a SLURM job). ``jobs`` trials run at once.

Resuming: ``n_trials`` is the number of finished trials (complete, or failed because their run
failed) the study should hold; a restart runs only the missing ones. A trial whose tune process
ended while it ran (Ctrl-C, SIGKILL, a lost login node) is "lost": marked failed without an
``error`` (not counted) and its parameters asked again first, continuing its run folder
(``resume=true`` when it holds checkpoints).

Why not Hydra's Optuna sweeper (``hydra/sweeper=optuna``, hydra-optuna-sweeper 1.3.0): it pins
``optuna<3``, which resolves to optuna 2.10.1 with SQLAlchemy 2.1 and alembic 1.20, and optuna
2.10.1's RDB storage fails on SQLAlchemy 2 (``create_study(storage="sqlite:///...")``:
AssertionError in ``_VersionManager.get_current_version``, alembic reads no schema version);
it works only with ``sqlalchemy<2`` and ``alembic<1.14`` pinned as well. It would also run
``n_trials`` more trials on every start instead of the missing ones, leave the trials of a
killed sweep RUNNING, and take a trial's values from the task's return value, which for
run.py is the clean error alone. Hydra's sweepers must live in the ``hydra_plugins`` package,
so lipexp's own would be a second top-level package. Hence this command, on Optuna >= 3's
ask-and-tell API, launching each trial as its own ``run.py -m``: Hydra's multirun cannot
express a batch of trials with different parameters (it sweeps a product), so the
parallelism is ``jobs`` processes, each through the chosen launcher.
"""

import fcntl
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipexp.config.overrides import hydra_quoted, override_key
from lipexp.config.root import CONF
from lipexp.files import atomic_path
from lipexp.runs.folder import RunFolder, read_results

RUN_PY = CONF.parent / "run.py"  # the trials' entry point: lipexp's own run path
SPEC_FILE = "tune.yaml"  # the sweep file as it ran, in the sweep folder (lipexp.report.pareto)
STUDY_FILE = "study.db"  # the default storage: sqlite:///<sweep folder>/study.db
TRIAL_LOGS = "trials"  # <sweep folder>/trials/trial_0003.log: a trial's console output


@dataclass(frozen=True)
class Metric:
    path: tuple[str, ...]  # where results.json holds it
    direction: str  # "minimize" or "maximize"
    label: str


METRICS = {
    "clean_error": Metric(("clean", "error"), "minimize", "clean test error"),
    "l2_median": Metric(("ensemble", "l2", "median"), "maximize",
                        "best-known median l2 distance"),
    "linf_median": Metric(("ensemble", "linf", "median"), "maximize",
                          "best-known median linf distance"),
}
KEYS = {"name", "n_trials", "objectives", "clean_error_cap", "params", "overrides", "sampler",
        "storage", "jobs"}


class TuneError(ValueError):
    """A sweep file or command line that cannot be tuned: one line saying why."""


@dataclass
class TuneSpec:
    """A sweep file with the command line's overrides applied (``load_spec``)."""

    name: str
    folder: Path  # the sweep folder: the trials' run folders, study.db, tune.yaml, the report
    n_trials: int
    objectives: list[str]
    params: dict[str, str]  # override key -> Hydra sweep expression
    overrides: list[str] = field(default_factory=list)  # every trial's (run config)
    hydra_overrides: list[str] = field(default_factory=list)  # hydra/launcher=..., hydra.*
    clean_error_cap: float | None = None
    sampler: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None  # None: sqlite:///<folder>/study.db
    jobs: int = 1

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.folder / STUDY_FILE).resolve()}"

    @property
    def directions(self) -> list[str]:
        return [METRICS[o].direction for o in self.objectives]

    def record(self) -> dict[str, Any]:
        """The spec as tune.yaml holds it (the default storage as null: beside the file)."""
        return {"name": self.name, "n_trials": self.n_trials, "objectives": self.objectives,
                "clean_error_cap": self.clean_error_cap, "params": self.params,
                "overrides": self.overrides, "hydra_overrides": self.hydra_overrides,
                "sampler": self.sampler, "storage": self.storage, "jobs": self.jobs}


def _is_sweep(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).is_sweep_override()


def load_spec(path: str | Path, overrides: Sequence[str] = (), *, n_trials: int | None = None,
              jobs: int | None = None) -> TuneSpec:
    """The sweep file at ``path`` with the command line's ``overrides``: a sweep expression
    (``KEY=interval(0, 1)``, ``KEY=a,b``) adds or replaces a parameter, ``KEY=VALUE`` fixes
    ``KEY`` for every trial (and takes it out of the search space), ``name=`` renames the
    study, ``hydra.sweep.dir=`` moves the sweep folder (default ``multirun/<name>``), other
    ``hydra.*`` and ``hydra/...`` overrides go to each trial's Hydra (its launcher)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TuneError(f"cannot read the sweep file {path}: {e}") from None
    if not isinstance(data, dict):
        raise TuneError(f"{path}: a sweep file is a mapping (name, n_trials, objectives, params)")
    if unknown := sorted(set(data) - KEYS):
        raise TuneError(f"{path}: unknown keys {unknown}; a sweep file has {sorted(KEYS)}")
    params = {str(k): str(v) for k, v in (data.get("params") or {}).items()}
    plain: dict[str, str] = {}  # the fixed overrides, one per key: the last one given
    name, folder, hydra = str(data.get("name") or Path(path).stem), None, []
    for item in [*(str(o) for o in data.get("overrides") or []), *overrides]:
        if "=" not in item:
            raise TuneError(f"{item!r} is not an override (KEY=VALUE)")
        key, value = override_key(item), item.partition("=")[2]
        if key == "hydra.sweep.dir":
            folder = Path(value.strip("'\""))
        elif key == "name":
            name = value
        elif key.startswith(("hydra.", "hydra/")):
            hydra.append(item)
        else:
            params = {k: v for k, v in params.items() if override_key(k) != key}
            plain.pop(key, None)
            if _is_sweep(item):
                params[item.partition("=")[0]] = value
            else:
                plain[key] = item
    fixed = list(plain.values())
    objectives = data.get("objectives") or ["clean_error", "l2_median"]
    objectives = [objectives] if isinstance(objectives, str) else list(objectives)
    if (not objectives or any(o not in METRICS for o in objectives)
            or len(set(objectives)) < len(objectives)):
        raise TuneError(f"{path}: objectives must be distinct names of {sorted(METRICS)}, "
                        f"not {objectives}")
    cap = data.get("clean_error_cap")
    if cap is not None and not (isinstance(cap, int | float) and 0 < cap <= 1):
        raise TuneError(f"{path}: clean_error_cap is a fraction in (0, 1], not {cap!r}")
    n = n_trials if n_trials is not None else data.get("n_trials", 20)
    jobs = jobs if jobs is not None else data.get("jobs", 1)
    for what, value in (("n_trials", n), ("jobs", jobs)):
        if not isinstance(value, int) or value < (0 if what == "n_trials" else 1):
            raise TuneError(f"{what} must be an integer >= {0 if what == 'n_trials' else 1}, "
                            f"not {value!r}")
    if not params:
        raise TuneError(f"{path}: no parameter to tune (params: KEY: interval(...), ...)")
    sampler = data.get("sampler") or {}
    if not isinstance(sampler, dict):
        raise TuneError(f"{path}: sampler is a mapping (name: TPESampler, seed: 0, ...)")
    spec = TuneSpec(name=name, folder=folder or Path("multirun") / name, n_trials=n,
                    objectives=objectives, params=params, overrides=fixed, hydra_overrides=hydra,
                    clean_error_cap=cap, sampler=sampler, storage=data.get("storage"),
                    jobs=jobs)
    search_space(spec.params)  # a bad expression is refused now
    return spec


def search_space(params: Mapping[str, str]) -> dict[str, Any]:
    """``{name: optuna distribution}`` of Hydra sweep expressions, as Hydra's Optuna sweeper
    reads them: ``choice(...)`` / ``a,b`` categorical, ``range(start, stop[, step])`` int or
    float steps (stop excluded, as in Hydra), ``interval(low, high)`` uniform (ints: integers),
    ``tag(log, interval(...))`` log-uniform. The name is the override's key without ``+``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Transformer
    from hydra.errors import HydraException
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    parser, space = OverridesParser.create(), {}
    for key, expression in params.items():
        try:
            override = parser.parse_override(f"{key}={expression}")
        except HydraException as e:
            raise TuneError(f"params: {key}: {expression!r} does not parse: {e}") from None
        if not override.is_sweep_override():
            raise TuneError(f"params: {key}: {expression!r} is not a search space (choice, "
                            "range, interval, tag(log, interval)); fix it in overrides")
        value, name = override.value(), override_key(key)
        try:
            if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
                space[name] = CategoricalDistribution(
                    list(override.sweep_iterator(transformer=Transformer.encode)))
            elif override.is_range_sweep():
                values = list(override.sweep_iterator())
                if all(isinstance(v, int) for v in [*values, value.step]):
                    space[name] = IntDistribution(values[0], values[-1], step=int(value.step))
                else:
                    space[name] = FloatDistribution(values[0], values[-1], step=value.step)
            else:  # interval
                log = "log" in value.tags
                if isinstance(value.start, int) and isinstance(value.end, int):
                    space[name] = IntDistribution(value.start, value.end, log=log)
                else:
                    space[name] = FloatDistribution(value.start, value.end, log=log)
        except (ValueError, IndexError) as e:
            raise TuneError(f"params: {key}: {expression!r}: {e}") from None
    return space


def override_value(value: Any) -> str:
    """A parameter's value as Hydra reads it back (floats exactly: ``repr``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def trial_overrides(spec: TuneSpec, params: Mapping[str, Any]) -> list[str]:
    """A trial's run-config overrides: the fixed ones, then its parameters (``+`` kept)."""
    keys = {override_key(k): k for k in spec.params}
    return [*spec.overrides, *(f"{keys.get(k, k)}={override_value(v)}" for k, v in params.items()),
            f"name={hydra_quoted(spec.name)}"]


def run_folder(spec: TuneSpec, overrides: Sequence[str]) -> Path:
    """The run folder of a trial: ``<sweep folder>/<run name>``, as Hydra names the job's
    (conf/hydra/default.yaml's ``${sweep_subdir:}``): composed here, without running it."""
    from hydra.errors import HydraException

    from lipexp.config.resolvers import sweep_subdir
    from lipexp.config.root import compose

    try:
        return spec.folder / sweep_subdir(_root_=compose("config", overrides))
    except HydraException as e:
        raise TuneError(f"the trial's config does not compose ({' '.join(overrides)}): "
                        f"{' '.join(str(e).split())}") from None


def first_params(space: Mapping[str, Any]) -> dict[str, Any]:
    """One point of ``space`` (each distribution's low end, or first choice): to check that
    the trials' config composes before the study starts."""
    return {k: d.choices[0] if hasattr(d, "choices") else d.low for k, d in space.items()}


# ------------------------------------------------------------------ launching trials


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


def _busy(folder: Path) -> bool:
    """Whether a live process holds the run folder's lock (lipexp.runs.folder.RunFolder)."""
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def metrics(results: Mapping[str, Any]) -> dict[str, float | None]:
    """``METRICS`` of a run's results.json (None where missing; a median of more than half
    unbroken images, null in results.json, is +inf)."""
    found = {}
    for name, metric in METRICS.items():
        node: Any = results
        for key in metric.path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is None and metric.path[-1] == "median" and isinstance(
                (results.get("ensemble") or {}).get(metric.path[1]), Mapping):
            node = math.inf  # the ensemble is there, its median is not finite
        found[name] = _float(node)
    return found


def _sampler(spec: TuneSpec, seed_offset: int):
    """``optuna.samplers.<sampler.name>(**rest)`` (default TPESampler); a ``seed`` is offset
    by the number of trials already in the study, so that a restart does not draw its first
    trials again. With a ``clean_error_cap`` on an Optuna without ``Trial.set_constraint``
    (< 5), the sampler reads the constraint from the trial's user attributes."""
    import inspect

    import optuna

    kwargs = dict(spec.sampler)
    name = kwargs.pop("name", "TPESampler")
    cls = getattr(optuna.samplers, str(name), None)
    if not isinstance(cls, type):
        raise TuneError(f"sampler: optuna.samplers has no {name!r}")
    if isinstance(kwargs.get("seed"), int):
        kwargs["seed"] += seed_offset
    if (spec.clean_error_cap is not None and not hasattr(optuna.trial.Trial, "set_constraint")
            and "constraints_func" in inspect.signature(cls).parameters):
        kwargs["constraints_func"] = _constraints
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TuneError(f"sampler: {name}: {e}") from None


def _constraints(trial) -> list[float]:
    return list(trial.user_attrs.get("constraint", [0.0]))


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune prints its own line per trial


def open_study(spec: TuneSpec):
    """The study of ``spec`` (created, or loaded: ``load_if_exists``); TuneError if the
    stored one has other objectives or cap."""
    import optuna

    _quiet_optuna()
    storage: Any = spec.storage_url
    if storage.startswith("sqlite:"):  # several tune processes may share the file
        storage = optuna.storages.RDBStorage(storage, engine_kwargs={
            "connect_args": {"timeout": 60}})
    study = optuna.create_study(storage=storage, study_name=spec.name, load_if_exists=True,
                                directions=spec.directions)
    stored = study.user_attrs.get("objectives")
    if stored is None:
        study.set_user_attr("objectives", spec.objectives)
        study.set_user_attr("clean_error_cap", spec.clean_error_cap)
    elif (stored != spec.objectives
          or study.user_attrs.get("clean_error_cap") != spec.clean_error_cap):
        raise TuneError(
            f"study {spec.name!r} in {spec.storage_url} has objectives {stored} and clean error "
            f"cap {study.user_attrs.get('clean_error_cap')}, not {spec.objectives} and "
            f"{spec.clean_error_cap}: use another name= or hydra.sweep.dir=")
    study.sampler = _sampler(spec, len(study.trials))
    return study


def _counted(trial) -> bool:
    """Whether a finished trial counts towards ``n_trials``: complete (or pruned), or failed
    because its run failed (user attribute ``error``); not a lost one."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def _requeue(study, trial) -> None:
    """A lost trial: failed without ``error`` (not counted), its parameters asked again."""
    from optuna.trial import TrialState

    study.tell(trial.number, state=TrialState.FAIL)
    study.enqueue_trial(dict(trial.params), user_attrs={"rerun_of": trial.number})


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
        if trial.user_attrs.get("host") == host and isinstance(pid, int) and not _alive(pid):
            lost.append(trial)
        else:
            elsewhere.append(trial)
    for trial in lost:
        _requeue(study, trial)
    finished = sum(_counted(t) for t in study.get_trials(deepcopy=False))
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
            _requeue(study, flight.trial)
        raise
    return {"folder": str(spec.folder), "storage": spec.storage_url, "started": started,
            "finished": sum(_counted(t) for t in study.get_trials(deepcopy=False)),
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
    while _busy(folder) and time.monotonic() < deadline:
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


# ------------------------------------------------------------------ reading a study


def read_study(folder: str | Path) -> dict[str, Any] | None:
    """The study of a sweep folder that ``tune`` wrote (None: no tune.yaml there): ``{"name",
    "objectives", "clean_error_cap", "params" (the tuned keys), "storage", "trials": [{"number",
    "state", "params", "run_folder", "clean_error", "l2_median", "linf_median", "error",
    "rerun_of", "counted"}]}``."""
    import yaml

    folder = Path(folder)
    if not (folder / SPEC_FILE).is_file():
        return None
    record = yaml.safe_load((folder / SPEC_FILE).read_text()) or {}
    import optuna

    _quiet_optuna()
    storage = record.get("storage") or f"sqlite:///{(folder / STUDY_FILE).resolve()}"
    study = optuna.load_study(study_name=record["name"], storage=storage)
    trials = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        trials.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                       "run_folder": attrs.get("run_folder"), "error": attrs.get("error"),
                       "rerun_of": attrs.get("rerun_of"), "counted": _counted(t),
                       **{m: _float(attrs.get(m)) for m in METRICS}})
    return {"name": record["name"], "objectives": record.get("objectives", []),
            "clean_error_cap": record.get("clean_error_cap"),
            "params": [override_key(k) for k in record.get("params", {})],
            "storage": storage, "trials": trials}
