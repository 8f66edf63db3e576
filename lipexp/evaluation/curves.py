"""Error curves from per-image adversarial distances (docs/method.md, "Evaluation protocol").

``distances`` is 1-D (a tensor or array, one entry per image): the smallest perturbation
norm at which the attack succeeds, 0 for an image misclassified clean, +inf for an image
the attack never breaks. The error curve is their empirical distribution function

    C(eps) = #{i : d_i <= eps} / N,

so ``C(0)`` is the clean error and ``C(eps) -> 1 - (fraction of +inf)`` for large eps.

Precision: a size ``eps`` is rounded to the distances' floating precision before it is
compared (float32 distances -> float32 eps), so an attack run at size 8/255 in float32
that reports a distance of exactly ``float32(8/255)`` counts as broken at 8/255.
"""

import math
from collections.abc import Iterable

import numpy as np
import torch

# eps_grid's range when no distance is finite and positive (all 0 or +inf)
FALLBACK_RANGE = (1e-3, 1.0)


def _distances(distances) -> tuple[np.ndarray, np.dtype]:
    """The distances sorted as float64, and the precision to round sizes to."""
    if isinstance(distances, torch.Tensor):
        distances = distances.detach().cpu()
        if distances.dtype == torch.bfloat16:  # numpy has no bfloat16
            distances = distances.float()
        distances = distances.numpy()
    d = np.asarray(distances)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"distances must be a non-empty 1-D array, got shape {d.shape}")
    precision = d.dtype if d.dtype in (np.float16, np.float32) else np.dtype(np.float64)
    d = np.sort(d.astype(np.float64))
    if np.isnan(d).any() or d[0] < 0:
        raise ValueError("distances must be >= 0 (0: misclassified clean, +inf: unbroken)")
    return d, precision


def _cdf(sorted_d: np.ndarray, precision: np.dtype, eps) -> np.ndarray:
    """``C(eps)`` for each eps, by binary search in the sorted distances."""
    eps = np.asarray(eps, dtype=np.float64).astype(precision).astype(np.float64)
    return np.searchsorted(sorted_d, eps, side="right") / sorted_d.size


def error_curve(distances, eps) -> np.ndarray:
    """``C(eps) = #{i : d_i <= eps} / N`` for each eps of ``eps`` (fractions in [0, 1])."""
    return _cdf(*_distances(distances), eps)


def size_key(size: float) -> str:
    """The key of a size in ``error_at``: the shortest decimal of ``float32(size)``.

    Positional notation, no exponent, no trailing zeros: 0 -> "0", 0.1 -> "0.1",
    1.5 -> "1.5", 3.0 -> "3", 2/255 -> "0.007843138", 8/255 -> "0.03137255". A size gets
    the same key whether given in float32 or float64 (a fixed number of significant digits
    would not: 8/255 -> "0.0313725" but float32(8/255) -> "0.0313726").
    """
    return np.format_float_positional(np.float32(size), trim="-")


def error_at(distances, sizes: Iterable[float]) -> dict[str, float]:
    """``{size_key(s): C(s)}`` for each size ``s`` (fractions in [0, 1])."""
    sizes = [float(s) for s in sizes]
    errors = error_curve(distances, sizes)
    return {size_key(s): float(e) for s, e in zip(sizes, errors)}


def median_distance(distances) -> float:
    """The lower median of the distances, +inf ones included: ``min {d : C(d) >= 1/2}``.

    With the distances sorted, ``d_(1) <= ... <= d_(N)``, this is ``d_(ceil(N/2))``: the
    middle one for odd N, the lower of the two middle ones for even N. It is +inf exactly
    when fewer than half of the images are broken (when exactly half are, it is finite).
    """
    d, _ = _distances(distances)
    return float(d[math.ceil(d.size / 2) - 1])


def eps_grid(distances, num: int = 100) -> np.ndarray:
    """``num`` sizes: 0 (the clean error), then ``num - 1`` log-spaced sizes.

    The log-spaced part runs from half the smallest positive finite distance (so the curve
    shows its plateau at the clean error first) to 1.01 times the largest finite distance
    (so the last point has ``C = 1 - fraction of +inf``). If no distance is positive and
    finite (all 0 or +inf) the curve is flat and the range is ``FALLBACK_RANGE``.
    """
    if num < 2:
        raise ValueError(f"num must be >= 2 (0 and at least one positive size), got {num}")
    d, _ = _distances(distances)
    positive = d[(d > 0) & np.isfinite(d)]
    lo, hi = (positive[0] / 2, positive[-1] * 1.01) if positive.size else FALLBACK_RANGE
    return np.concatenate([[0.0], np.geomspace(lo, hi, num - 1)])


def summarize(distances, sizes: Iterable[float], num: int = 100,
              grid: np.ndarray | None = None) -> dict:
    """Everything reported for one (model, attack), as JSON-ready Python floats and lists.

    ``{"median": float, "n_unbroken": int (+inf distances), "n_images": int,
    "error_at": {size_key: fraction}, "curve": {"eps": [...], "error": [...]}}``;
    an infinite median is ``float("inf")``. The curve is on ``grid`` when given, else on
    ``eps_grid(distances, num)``.
    """
    d, precision = _distances(distances)
    grid = eps_grid(d, num) if grid is None else np.asarray(grid, dtype=np.float64)
    return {
        "median": median_distance(d),
        "n_unbroken": int(np.isinf(d).sum()),
        "n_images": int(d.size),
        "error_at": error_at(distances, sizes),  # the original dtype: same rounding of sizes
        "curve": {"eps": grid.tolist(), "error": _cdf(d, precision, grid).tolist()},
    }
