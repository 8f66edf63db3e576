"""The report's paired comparisons: each defence's best known median distance as a ratio to
a baseline row of its grid (default J0, the same data and model), on the SAME images, with
a paired 95% bootstrap interval (lipexp.evaluation.intervals.paired_ratio); a difference is
marked only when the interval excludes 1.

Pairs are image by image: a defence's run and the baseline's run of the same seed, over
the test images both evaluated (``distances.npz``'s ``indices``); the seeds' pairs are
pooled, so with several seeds the ratio is that of the medians over all (seed, image)
pairs. The interval is over the test images, for these trained models: it does not hold
the variation between training seeds (the report's intervals over seeds do).
"""

import math
from pathlib import Path

import numpy as np

from lipexp.evaluation.intervals import paired_ratio
from lipexp.report.runs import Run, config_values, setting_keys

BASELINE = "J0"  # the study's undefended training, the row each defence is compared with


def best_distances(folder: Path, norm: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(indices, d)``: a run's per-image best known distances of ``norm`` (distances.npz's
    ``ensemble_<norm>``; before lipexp 0.5, its PGD search's) and the test images' indices;
    None without them."""
    path = folder / "distances.npz"
    if not path.is_file():
        return None
    with np.load(path) as npz:
        key = next((k for k in (f"ensemble_{norm}", f"{norm}_pgd") if k in npz.files), None)
        if key is None or "indices" not in npz.files:
            return None
        return np.asarray(npz["indices"]), np.asarray(npz[key], dtype=np.float64)


def _pairs(runs: list[Run], baseline: list[Run], norm: str
           ) -> tuple[np.ndarray, np.ndarray, int]:
    """The pooled paired distances ``(d_defence, d_baseline)`` over the seeds both have,
    and the number of seeds paired."""
    base = {r.config.get("seed"): r for r in baseline}
    pooled_a, pooled_b, seeds = [], [], 0
    for run in runs:
        other = base.get(run.config.get("seed"))
        mine = best_distances(run.folder, norm)
        theirs = best_distances(other.folder, norm) if other is not None else None
        if mine is None or theirs is None:
            continue
        common, ia, ib = np.intersect1d(mine[0], theirs[0], return_indices=True)
        if common.size:
            pooled_a.append(mine[1][ia])
            pooled_b.append(theirs[1][ib])
            seeds += 1
    if not seeds:
        return np.empty(0), np.empty(0), 0
    return np.concatenate(pooled_a), np.concatenate(pooled_b), seeds


# Keys that make a defence what it is (the study's names): the baseline differs in them by
# definition; every other training key must agree for a pair (lipexp.report.runs).
DEFENCE_KEYS = ("adv.", "lip.", "head.")


def baseline_rows(defences: dict[str, list[Run]], baseline: str = BASELINE
                  ) -> dict[str, list[Run] | None]:
    """Each row's baseline runs: the baseline defence's row that trained as the row did, in
    every training key both hold but the defence's own (``DEFENCE_KEYS``): the same model
    width, optimizer, epochs, ... (rows ``J0 (model.width=8)``, ...: group_runs). None where
    no baseline row, or more than one, matches."""
    rows = {name: runs for name, runs in defences.items()
            if name == baseline or name.startswith(baseline + " (")}
    out: dict[str, list[Run] | None] = {}
    for name, runs in defences.items():
        keys = [k for k in setting_keys([*runs, *(r for b in rows.values() for r in b)])
                if not k.startswith(DEFENCE_KEYS)]
        mine = config_values(runs[0])
        match = [b for b, base in rows.items()
                 if all(mine[k] == config_values(base[0])[k] for k in keys)]
        out[name] = rows[match[0]] if len(match) == 1 else None
    return out


def baseline_ratios(defences: dict[str, list[Run]], norm: str = "l2",
                    baseline: str = BASELINE) -> dict[str, dict | None]:
    """For each defence of a grid: ``{"ratio", "interval", "differs", "n_seeds",
    "n_images"}`` of its best known median ``norm`` distance over its baseline row's
    (``baseline_rows``; None where nothing pairs: no baseline row, no distances.npz, no
    common seed or image)."""
    bases = baseline_rows(defences, baseline)
    out: dict[str, dict | None] = {}
    for name, runs in defences.items():
        if bases[name] is None:
            out[name] = None
            continue
        a, b, seeds = _pairs(runs, bases[name], norm)
        out[name] = (paired_ratio(a, b) | {"n_seeds": seeds, "n_images": int(a.size)}
                     if a.size else None)
    return out


def _number(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "∞"


def ratio_table(ratios: dict[str, dict | None], baseline: str = BASELINE,
                norm: str = "l2", n_seeds: dict[str, int] | None = None) -> list[str]:
    """Markdown: one row per defence (with ``(n=k)`` for k > 1 seeds, as the other tables),
    its ratio with the interval, ``*`` where the interval excludes 1."""
    lines = [f"| defence | best known median {norm} / {baseline}'s [95% paired interval] "
             "| pairs |", "|---|---:|---:|"]
    for defence, r in ratios.items():
        k = (n_seeds or {}).get(defence, 1)
        name = defence + (f" (n={k})" if k > 1 else "")
        if r is None:
            lines.append(f"| {name} | — | 0 |")
            continue
        interval = ("" if r["interval"] is None else
                    f" [{_number(r['interval'][0])}, {_number(r['interval'][1])}]")
        mark = " *" if r["differs"] else ""
        lines.append(f"| {name} | {_number(r['ratio'])}{interval}{mark} | "
                     f"{r['n_images']} images, {r['n_seeds']} seed(s) |")
    return lines
