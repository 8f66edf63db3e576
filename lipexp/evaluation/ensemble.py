"""The best known adversarial distance of each image: the minimum over the attacks of a norm.

Every attack's distance is an upper bound on the image's true adversarial distance (an
example of that norm that is misclassified), so their per-image minimum is one too, and
the tightest the evaluation has: the "ensemble" that AutoAttack reports as its worst case.
Its error curve lies on or above every attack's curve (more images broken at each size) and
its median on or below every attack's median.
"""

from collections.abc import Mapping

import numpy as np

from lipexp.attacks.distance import DistanceAttack
from lipexp.attacks.threat import Norm
from lipexp.evaluation.curves import median_distance
from lipexp.evaluation.intervals import optimality


def ensemble(attacks: Mapping[str, DistanceAttack], distances: Mapping[str, np.ndarray]
             ) -> dict[Norm, tuple[np.ndarray, dict[str, int]]]:
    """For each norm with an attack that measures distances (not only fixed-size checks,
    whose distances are a size or +inf: no median to report): ``(d, best_count)``,
    ``d_i = min_a d_a,i`` over the attacks ``a`` of that norm (fixed-size ones included:
    their distances are upper bounds too) and
    ``best_count[a] = #{i : 0 < d_i < inf and d_a,i = d_i}``, how many images attack ``a``
    found the best example for (ties count for each attack; images misclassified clean or
    never broken count for none)."""
    out = {}
    for norm in Norm:
        names = [name for name, attack in attacks.items() if attack.norm == norm]
        if all(attacks[name].fixed_size is not None for name in names):
            continue
        d = np.min(np.stack([distances[name] for name in names]), axis=0)  # (n,)
        decided = (d > 0) & np.isfinite(d)
        out[norm] = d, {name: int((decided & (distances[name] == d)).sum()) for name in names}
    return out


def headline_gaps(results: Mapping, distances: Mapping[str, np.ndarray], best: np.ndarray,
                  best_count: Mapping[str, int]) -> dict[str, dict[str, float | None]]:
    """Beside the best known median (the headline), each attack ``a`` of the norm: its gap
    ``median_a / median_best - 1`` (>= 0; None when a median is 0 or +inf; its own median
    is ``results["attacks"][a]["median"]``) and its ``optimality`` (intervals.py: 1.0 = the
    best example for every image)."""
    best_median = median_distance(best)
    medians = {a: results["attacks"][a].get("median") for a in best_count}
    gap = {a: (m / best_median - 1.0 if m is not None and np.isfinite(m) and m > 0
               and 0 < best_median < np.inf else None) for a, m in medians.items()}
    return {"gap": gap,
            "optimality": {a: optimality(distances[a], best) for a in best_count}}


ENSEMBLE_LABEL = "ensemble"  # the curve's name in the figure and the CSV: "ensemble l2"


def ensemble_curves(results: Mapping) -> dict[str, dict]:
    """The ensemble error curves in the ``curves`` format of plots.py, one per norm with
    two or more attacks (with one it is that attack's curve), drawn wide and grey under
    the attacks' curves."""
    style = {"color": "0.45", "lw": 3.0, "alpha": 0.6, "zorder": 1}
    return {f"{ENSEMBLE_LABEL} {norm}": {"norm": norm, "curve": entry["curve"], "style": style}
            for norm, entry in results.get("ensemble", {}).items() if len(entry["attacks"]) > 1}
