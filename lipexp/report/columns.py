"""The report's columns: a ``Stat`` reads one statistic from a run's results.json (and its
95% interval over the evaluated images, where results.json has one); the adversarial and
stability columns of the tables, one column per attack a grid's runs evaluated
(``AttackColumn``), their aggregation over seeds (mean ± sample std, with a t interval of
the mean; one seed: the run's own bootstrap interval) and their cells as the tables show
them. The headline columns are the best known distances (the per-image minimum over the
run's attacks of a norm: results.json's ``ensemble``)."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lipexp.evaluation.curves import size_key
from lipexp.evaluation.intervals import over_seeds
from lipexp.report.runs import Run, lookup

# the reference attacks: best known distances of runs written before lipexp 0.5
L2_ATTACK, LINF_ATTACK = "l2_pgd", "linf_pgd"


@dataclass(frozen=True)
class Stat:
    """One column: ``get(results)`` -> value or None; ``best`` is min or max; the cell shows
    ``scale * value`` with format ``spec`` (plus the value in 1/255 units if ``per255``)."""

    key: str
    header: str
    get: Callable[[dict], Any]
    best: Callable = min
    scale: float = 1.0
    spec: str = ".4g"
    per255: bool = False
    interval: Callable[[dict], Any] | None = None  # results -> [low, high] or None


def _infinite_median(entry: Any) -> bool:
    """A results.json entry whose null median means +inf (more than half the images
    unbroken; strict JSON has no Infinity)."""
    return isinstance(entry, dict) and entry.get("median", 0) is None and "n_unbroken" in entry


def _median(attack: str, entry_of: Callable[[dict], Any] | None = None
            ) -> Callable[[dict], Any]:
    """Getter of the median distance of ``attack`` (or of the entry ``entry_of(results)``):
    +inf where results.json has a null median with ``n_unbroken`` (more than half the images
    unbroken; strict JSON has no Infinity), None where the entry is missing."""

    def get(results: dict) -> Any:
        entry = entry_of(results) if entry_of else lookup(results, "attacks", attack)
        return math.inf if _infinite_median(entry) else lookup(entry, "median")

    return get


def _interval(value: Any) -> list[float] | None:
    """A results.json interval ``[low, high]`` (a null bound: +inf), else None."""
    if not isinstance(value, list) or len(value) != 2:
        return None
    return [math.inf if v is None else float(v) for v in value]


def best_entry(results: dict, norm: str) -> dict | None:
    """The best known distances of ``norm`` (results.json's ``ensemble``); a run written
    before lipexp 0.5 has none: its one attack of the norm (``l2_pgd``, ``linf_pgd``), whose
    distances are then the best known."""
    entry = lookup(results, "ensemble", norm)
    if isinstance(entry, dict):
        return entry
    entry = lookup(results, "attacks", L2_ATTACK if norm == "l2" else LINF_ATTACK)
    return entry if isinstance(entry, dict) else None


def _best_median(norm: str) -> Callable[[dict], Any]:
    return _median(norm, entry_of=lambda results: best_entry(results, norm))


def _best_median_interval(norm: str) -> Callable[[dict], Any]:
    return lambda results: _interval(lookup(best_entry(results, norm), "median_interval"))


def _best_error_at(norm: str, size: float) -> Callable[[dict], Any]:
    return _error_at(norm, size, entry_of=lambda results: best_entry(results, norm))


def _best_error_interval(norm: str, size: float) -> Callable[[dict], Any]:
    key = size_key(size)
    return lambda results: _interval(lookup(best_entry(results, norm), "error_at_interval", key))


def _error_at(attack: str, size: float,
              entry_of: Callable[[dict], Any] | None = None) -> Callable[[dict], Any]:
    """Getter of the error of ``attack`` (or of the entry ``entry_of(results)``) at ``size``:
    from ``error_at``, else from the curve if ``size`` is one of its grid points (same
    size_key), else None."""
    key = size_key(size)

    def get(results: dict) -> Any:
        entry = (entry_of(results) if entry_of else lookup(results, "attacks", attack)) or {}
        if key in (entry.get("error_at") or {}):
            return entry["error_at"][key]
        curve = entry.get("curve") or {}
        return next((e for eps, e in zip(curve.get("eps", []), curve.get("error", []))
                     if size_key(eps) == key), None)

    return get


ADVERSARIAL = (
    Stat("clean_error", "clean error (%)", lambda r: lookup(r, "clean", "error"),
         scale=100, spec=".2f", interval=lambda r: _interval(lookup(r, "clean", "error_interval"))),
    Stat("l2_median", "best known median l2 distance", _best_median("l2"), best=max,
         interval=_best_median_interval("l2")),
    Stat(f"l2_error_at_{size_key(0.1)}", "error (%) at l2 0.1", _best_error_at("l2", 0.1),
         scale=100, spec=".2f", interval=_best_error_interval("l2", 0.1)),
    Stat(f"l2_error_at_{size_key(1.5)}", "error (%) at l2 1.5", _best_error_at("l2", 1.5),
         scale=100, spec=".2f", interval=_best_error_interval("l2", 1.5)),
    Stat("linf_median", "best known median l-inf distance", _best_median("linf"), best=max,
         per255=True, interval=_best_median_interval("linf")),
    Stat(f"linf_error_at_{size_key(8 / 255)}", "error (%) at l-inf 8/255",
         _best_error_at("linf", 8 / 255), scale=100, spec=".2f",
         interval=_best_error_interval("linf", 8 / 255)),
)
STABILITY = (
    Stat("grad_loss_l2_max", "max ‖∇ℓ‖₂",
         lambda r: lookup(r, "stability", "grad_loss_l2", "max")),
    Stat("jac_2_inf_max", "max ‖∇f‖₂,∞", lambda r: lookup(r, "stability", "jac_2_inf", "max")),
    Stat("grad_loss_l1_max", "max ‖∇ℓ‖₁",
         lambda r: lookup(r, "stability", "grad_loss_l1", "max")),
    Stat("jac_1_1_max", "max ‖∇f‖₁,₁", lambda r: lookup(r, "stability", "jac_1_1", "max")),
    Stat("grad_loss_l2_mean", "mean ‖∇ℓ‖₂",
         lambda r: lookup(r, "stability", "grad_loss_l2", "mean")),
    # the Lipschitz analysis (docs/method.md, "Lipschitz estimates"): l2, of the logits
    Stat("lipschitz_empirical", "max ‖J‖₂ (lower bound on L)",
         lambda r: lookup(r, "lipschitz", "empirical_l2", "jacobian_max")),
    Stat("lipschitz_upper", "L upper bound", lambda r: lookup(r, "lipschitz", "upper_bound_l2")),
    Stat("lipschitz_ratio", "upper / lower", lambda r: lookup(r, "lipschitz", "ratio")),
    Stat("certified_l2_median", "median certified l2 radius",
         lambda r: lookup(r, "lipschitz", "certified", "l2", "median"), best=max),
)
NORM_NAMES = {"l2": "l2", "linf": "l-inf"}  # results.json's norm -> the tables' name


def _size_text(norm: str, size: float) -> str:
    """A size as the tables write it: l-inf in 1/255 units ("8/255"), others as numbers."""
    return f"{255 * size:.4g}/255" if norm == "linf" else f"{size:.4g}"


@dataclass(frozen=True)
class AttackColumn:
    """One attack of a grid, by its name in results.json: ``eps`` None for an attack with an
    error curve (its column: the median distance), else the size of a fixed-size attack
    (its column: the error at that size)."""

    name: str
    norm: str
    eps: float | None

    @property
    def stat(self) -> Stat:
        norm = NORM_NAMES.get(self.norm, self.norm)
        if self.eps is None:
            return Stat(self.name, f"{self.name}: median {norm} distance",
                        _median(self.name), best=max, per255=self.norm == "linf",
                        interval=lambda r: _interval(lookup(r, "attacks", self.name,
                                                            "median_interval")))
        return Stat(self.name, f"{self.name}: error (%) at {norm} "
                    f"{_size_text(self.norm, self.eps)}", _error_at(self.name, self.eps),
                    scale=100, spec=".2f")


    def against_best(self) -> tuple[Stat, Stat]:
        """Its gap to the best known median of its norm, ``median_a / median_best - 1``
        (%), and its optimality (1.0: the best example for every image; docs/evaluation.md)."""
        return (Stat(f"{self.name}_gap", f"{self.name}: gap (%)",
                     lambda r: lookup(r, "ensemble", self.norm, "gap", self.name), scale=100,
                     spec=".2f"),
                Stat(f"{self.name}_optimality", f"{self.name}: optimality",
                     lambda r: lookup(r, "ensemble", self.norm, "optimality", self.name),
                     best=max, spec=".4f"))


def attack_columns(runs: list[Run]) -> tuple[AttackColumn, ...]:
    """Every attack of the runs' results.json, in order of first appearance; an attack is
    described by the first run that has it with a median or a fixed size (``eps``)."""
    columns: dict[str, AttackColumn] = {}
    for run in runs:
        for name, entry in (lookup(run.results, "attacks") or {}).items():
            if name in columns or not isinstance(entry, dict):
                continue
            norm = str(entry.get("norm", "?"))
            if "median" in entry:
                columns[name] = AttackColumn(name, norm, None)
            elif isinstance(entry.get("eps"), int | float):
                columns[name] = AttackColumn(name, norm, float(entry["eps"]))
    return tuple(columns.values())


def aggregate(runs: list[Run], stats: tuple[Stat, ...]) -> dict[str, dict]:
    """{stat key: {"mean", "std", "n", "interval"}} over the runs that have the statistic;
    std is the sample standard deviation (NaN for fewer than 2 values or an infinite one),
    mean NaN when no run has it; ``interval`` the 95% t interval of the mean over seeds
    (intervals.over_seeds), or for one run its own interval over the evaluated images (None
    where there is none)."""
    out = {}
    for stat in stats:
        have = [(float(v), r) for r in runs
                if isinstance(v := stat.get(r.results), int | float) and not math.isnan(v)]
        values = [v for v, _ in have]
        finite = all(math.isfinite(v) for v in values)
        if len(have) == 1:
            interval = stat.interval(have[0][1].results) if stat.interval else None
        else:
            interval = over_seeds(values)["interval"]
        out[stat.key] = {
            "mean": float(np.mean(values)) if values else math.nan,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 and finite else math.nan,
            "n": len(values),
            "interval": interval,
        }
    return out


def _shown(stat: Stat, value: float) -> float:
    """``value`` as the table shows it (rounded), to compare cells; NaN stays NaN."""
    return value if not math.isfinite(value) else float(f"{stat.scale * value:{stat.spec}}")


def format_cell(stat: Stat, mean: float, std: float, n: int = 1, n_seeds: int = 1,
                interval: list[float] | None = None) -> str:
    """"12.34", "12.34 [11.9, 12.8]" (one run: its 95% interval over the images),
    "12.34 ± 0.56 [11.7, 13.0]" (seeds: sample std and the t interval of the mean), "∞"
    (infinite mean), "—" (not available); "(n=k)" when only k of the n_seeds runs have the
    statistic; the l-inf median also in 1/255 units."""
    if math.isnan(mean):
        return "—"
    if math.isinf(mean):
        text = "∞"
    else:
        text = f"{stat.scale * mean:{stat.spec}}"
        if not math.isnan(std):
            text += f" ± {stat.scale * std:{stat.spec}}"
        if interval is not None:
            low, high = (f"{stat.scale * b:{stat.spec}}" if math.isfinite(b) else "∞"
                         for b in interval)
            text += f" [{low}, {high}]"
        if stat.per255:
            text += f" ({255 * mean:.2f}/255)"
    return text + (f" (n={n})" if n < n_seeds else "")


def best_rows(rows: list[dict], stat: Stat) -> set[int]:
    """Indices of the rows whose shown value (``row["stats"][stat.key]["mean"]`` rounded as
    the cell shows it) is the best (ties: all); none for < 2 values."""
    shown = {i: _shown(stat, row["stats"][stat.key]["mean"]) for i, row in enumerate(rows)}
    shown = {i: v for i, v in shown.items() if not math.isnan(v)}
    if len(shown) < 2:
        return set()
    best = stat.best(shown.values())
    return {i for i, v in shown.items() if v == best}
