"""A tuning sweep file (sweeps/tune_*.yaml) with the command line's overrides: the study's
name, search space, objectives and trials' overrides (``load_spec``), and the numbers a
trial's results.json reports (``metrics``)."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipexp.config.overrides import hydra_quoted, override_key
from lipexp.config.root import CONF

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



def number_or_none(value: Any) -> float | None:
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
        found[name] = number_or_none(node)
    return found
