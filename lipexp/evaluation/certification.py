"""The Lipschitz part of an evaluation (docs/method.md, "Lipschitz estimates",
"Guarantees"): the model's data-independent upper bound against its empirical lower bound,
and each image's certified radius, with the certified error curves.

results.json["lipschitz"]:
- ``upper_bound_l2``: ``prod_k L_k``, the l2 Lipschitz bound of the logits (model_bounds);
- ``empirical_l2``: ``jacobian_max`` (the largest ``||J(x_i)||_2`` over the evaluated
  images, a lower bound on the constant), ``jacobian_mean``, ``grad_loss_max`` (the largest
  ``||grad_x l(x_i)||_2``, the quantity Lip2 penalizes);
- ``ratio``: ``upper_bound_l2 / jacobian_max`` (None when the Jacobian vanishes);
- ``certified``: per norm, the summary of the certified radii as of an attack's distances
  (``median``, ``error_at``, ``curve``: the fraction of images NOT certified at each size,
  an upper bound on any attack's error), plus the reference attack's median, the gap of the
  medians and ``violations``: images whose radius exceeds the reference attack's distance,
  which cannot happen unless something is wrong (a check warns).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from lipexp.attacks.distance import DistanceAttack
from lipexp.attacks.threat import Norm
from lipexp.evaluation.curves import eps_grid, median_distance, summarize
from lipexp.lipschitz.certified import linf_radii, radii_from_margins
from lipexp.lipschitz.model_bounds import upper_bound

CERTIFIED_LABEL = "certified (upper bound on error)"  # its curve in the figure and the CSV


def lipschitz_results(
    model: nn.Module,
    input_shape: Sequence[int],
    margin: Tensor,
    jacobian_l2: Tensor,
    grad_loss_l2: Tensor,
    distances: Mapping[str, np.ndarray],
    attacks: Mapping[str, DistanceAttack],
    error_at_sizes: Mapping[Norm, Sequence[float]],
    grid_points: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(results["lipschitz"], {"certified_l2": radii, "certified_linf": radii})`` from the
    per-image clean ``margin`` ``z_y - max_{j != y} z_j``, lower bounds on the Jacobian's
    spectral norm and loss-gradient norms (N,) of the evaluated images and the attacks'
    distances."""
    upper = upper_bound(model, tuple(input_shape))
    empirical = float(jacobian_l2.max())
    radii_l2 = radii_from_margins(margin.double(), upper)  # (N,)
    radii = {Norm.l2: radii_l2, Norm.linf: linf_radii(radii_l2, int(np.prod(input_shape)))}
    certified = {}
    for norm, r in radii.items():
        r = r.numpy()
        ref = next((n for n, a in attacks.items() if a.reference and a.norm == norm), None)
        if ref is None:
            certified[norm.value] = summarize(r, error_at_sizes[norm], num=grid_points)
            continue
        d = distances[ref].astype(np.float64)
        # the curve on sizes that span both the radii and the attack's distances, so that one
        # axis shows both curves whole (a loose bound's radii sit decades below)
        entry = summarize(r, error_at_sizes[norm], grid=eps_grid(np.concatenate([r, d]),
                                                                 grid_points))
        ref_median = median_distance(d)
        over = r > d * (1 + 1e-5) + 1e-12  # tolerance: d are float32 norms of found examples
        certified[norm.value] = entry | {
            "reference_attack": ref, "reference_median": ref_median,
            "median_gap": ref_median - entry["median"], "violations": int(over.sum())}
    results = {
        "upper_bound_l2": upper,
        "empirical_l2": {"jacobian_max": empirical, "jacobian_mean": float(jacobian_l2.mean()),
                         "grad_loss_max": float(grad_loss_l2.max())},
        "ratio": upper / empirical if empirical > 0 else None,
        "certified": certified,
        "note": "l2 Lipschitz constants of the logits; certified l-infinity radii are the "
                "l2 ones / sqrt(n)",
    }
    return results, {f"certified_{n.value}": r.float().numpy() for n, r in radii.items()}


def certified_curves(lipschitz: Mapping[str, Any]) -> dict[str, dict]:
    """The certified error curves in the ``curves`` format of plots.py, one per norm, drawn
    dashed in black next to the attacks' curves."""
    style = {"color": "black", "ls": "--", "lw": 1.2}
    return {f"{CERTIFIED_LABEL} {norm}": {"norm": norm, "curve": entry["curve"], "style": style}
            for norm, entry in lipschitz["certified"].items()}


def violation_warnings(lipschitz: Mapping[str, Any]) -> list[str]:
    """A warning when a certified radius exceeds an adversarial distance that was found."""
    return [f"{entry['violations']} certified {norm} radii exceed the distances that "
            f"{entry['reference_attack']} found: the Lipschitz bound or the attack is wrong "
            "(see docs/evaluation.md#a-certified-radius-exceeds-a-distance)"
            for norm, entry in lipschitz["certified"].items() if entry.get("violations")]
