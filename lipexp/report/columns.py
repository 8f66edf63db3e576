"""The report's columns: a ``Stat`` reads one statistic from a run's results.json; the
adversarial and stability columns of the tables, one column per attack a grid's runs
evaluated (``AttackColumn``), their aggregation over seeds (mean ± sample std) and their
cells as the tables show them."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lipexp.evaluation.curves import size_key
from lipexp.report.runs import Run, lookup

L2_ATTACK, LINF_ATTACK = "l2_pgd", "linf_pgd"  # the attacks of the tables (results.json names)


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


def _median(attack: str) -> Callable[[dict], Any]:
    """Getter of the median distance of ``attack``: +inf where results.json has a null median
    with ``n_unbroken`` (more than half the images unbroken; strict JSON has no Infinity),
    None where the entry is missing."""

    def get(results: dict) -> Any:
        entry = lookup(results, "attacks", attack)
        if isinstance(entry, dict) and entry.get("median", 0) is None and "n_unbroken" in entry:
            return math.inf
        return lookup(entry, "median")

    return get


def _error_at(attack: str, size: float) -> Callable[[dict], Any]:
    """Getter of the error of ``attack`` at ``size``: from ``error_at``, else from the curve
    if ``size`` is one of its grid points (same size_key), else None."""
    key = size_key(size)

    def get(results: dict) -> Any:
        entry = lookup(results, "attacks", attack) or {}
        if key in (entry.get("error_at") or {}):
            return entry["error_at"][key]
        curve = entry.get("curve") or {}
        return next((e for eps, e in zip(curve.get("eps", []), curve.get("error", []))
                     if size_key(eps) == key), None)

    return get


ADVERSARIAL = (
    Stat("clean_error", "clean error (%)", lambda r: lookup(r, "clean", "error"),
         scale=100, spec=".2f"),
    Stat("l2_median", "median l2 distance", _median(L2_ATTACK), best=max),
    Stat(f"l2_error_at_{size_key(0.1)}", "error (%) at l2 0.1", _error_at(L2_ATTACK, 0.1),
         scale=100, spec=".2f"),
    Stat(f"l2_error_at_{size_key(1.5)}", "error (%) at l2 1.5", _error_at(L2_ATTACK, 1.5),
         scale=100, spec=".2f"),
    Stat("linf_median", "median l-inf distance",
         _median(LINF_ATTACK), best=max, per255=True),
    Stat(f"linf_error_at_{size_key(8 / 255)}", "error (%) at l-inf 8/255",
         _error_at(LINF_ATTACK, 8 / 255), scale=100, spec=".2f"),
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
                        _median(self.name), best=max,
                        per255=self.norm == "linf")
        return Stat(self.name, f"{self.name}: error (%) at {norm} "
                    f"{_size_text(self.norm, self.eps)}", _error_at(self.name, self.eps),
                    scale=100, spec=".2f")


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


def aggregate(runs: list[Run], stats: tuple[Stat, ...]) -> dict[str, dict[str, float]]:
    """{stat key: {"mean", "std", "n"}} over the runs that have the statistic; std is the
    sample standard deviation (NaN for fewer than 2 values or an infinite one), mean NaN when
    no run has it."""
    out = {}
    for stat in stats:
        values = [float(v) for v in (stat.get(r.results) for r in runs)
                  if isinstance(v, int | float) and not math.isnan(v)]
        finite = all(math.isfinite(v) for v in values)
        out[stat.key] = {
            "mean": float(np.mean(values)) if values else math.nan,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 and finite else math.nan,
            "n": len(values),
        }
    return out


def _shown(stat: Stat, value: float) -> float:
    """``value`` as the table shows it (rounded), to compare cells; NaN stays NaN."""
    return value if not math.isfinite(value) else float(f"{stat.scale * value:{stat.spec}}")


def format_cell(stat: Stat, mean: float, std: float, n: int = 1, n_seeds: int = 1) -> str:
    """"12.34", "12.34 ± 0.56", "∞" (infinite mean), "—" (not available); "(n=k)" when only
    k of the n_seeds runs have the statistic; the l-inf median also in 1/255 units."""
    if math.isnan(mean):
        return "—"
    if math.isinf(mean):
        text = "∞"
    else:
        text = f"{stat.scale * mean:{stat.spec}}"
        if not math.isnan(std):
            text += f" ± {stat.scale * std:{stat.spec}}"
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
