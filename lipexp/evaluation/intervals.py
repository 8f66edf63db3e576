"""Uncertainty of the evaluation's numbers: 95% bootstrap intervals over the evaluated images
(docs/evaluation.md, "Intervals").

Each number is a statistic of the per-image adversarial distances ``d`` (curves.py): the
lower median ``d_(ceil(N/2))``, the error at a size ``C(eps) = #{i : d_i <= eps} / N``, the
clean error ``#{i : d_i = 0} / N``. Its interval is SciPy's percentile bootstrap
(``scipy.stats.bootstrap``, ``method="percentile"``, ``N_RESAMPLES`` resamples of the N
images, seeded): the 2.5% and 97.5% quantiles of the statistic over the resamples. The
percentile method, not BCa: the median is an order statistic, whose jackknife (BCa's
acceleration) is degenerate with ties and +inf distances. Comparisons are paired: the
ratio of two models' medians on the SAME images is bootstrapped by resampling the images
jointly (``paired_ratio``). Across seeds, a t interval of the mean (``over_seeds``).

+inf distances (images never broken) stay +inf: the bootstrap runs on the distances with
+inf replaced by a finite stand-in above every finite one, and a bound above the largest
finite distance is +inf again (the median of a resample is then +inf).
"""

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from scipy import stats

from lipexp.evaluation.curves import size_key

CONFIDENCE = 0.95
N_RESAMPLES = 2000  # Monte Carlo error of a 2.5% quantile: ~0.35% of the resamples
SEED = 0  # every interval of a run from the same resamples' seed: reproducible
METHOD = "percentile"
DESCRIPTION = {"confidence": CONFIDENCE, "method": f"{METHOD} bootstrap over the evaluated "
               "images (scipy.stats.bootstrap)", "n_resamples": N_RESAMPLES, "seed": SEED}


def _finite_stand_in(d: np.ndarray) -> tuple[np.ndarray, float]:
    """``d`` (float64) with +inf replaced by a value above every finite one, and the largest
    finite value (0 if none)."""
    d = np.asarray(d, dtype=np.float64)
    finite = d[np.isfinite(d)]
    top = float(finite.max()) if finite.size else 0.0
    return np.where(np.isinf(d), 2 * top + 1.0, d), top


def lower_median(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x_(ceil(N/2))`` along ``axis`` (curves.median_distance, vectorized)."""
    n = x.shape[axis]
    return np.take(np.sort(x, axis=axis), math.ceil(n / 2) - 1, axis=axis)


def _bootstrap(samples: tuple[np.ndarray, ...], statistic: Callable, seed: int, paired: bool
               ) -> tuple[np.ndarray, np.ndarray]:
    result = stats.bootstrap(samples, statistic, n_resamples=N_RESAMPLES,
                             confidence_level=CONFIDENCE, method=METHOD, paired=paired,
                             vectorized=True, rng=np.random.default_rng(seed))
    return (np.asarray(result.confidence_interval.low, dtype=np.float64),
            np.asarray(result.confidence_interval.high, dtype=np.float64))


def median_interval(d, seed: int = SEED) -> list[float] | None:
    """``[low, high]``: the 95% interval of the lower median of ``d`` (None for one image)."""
    finite, top = _finite_stand_in(d)
    if finite.size < 2:
        return None
    low, high = _bootstrap((finite,), lower_median, seed, paired=False)
    return [float(b) if b <= top else math.inf for b in (low, high)]


def _fractions(eps: np.ndarray) -> Callable:
    """The statistic ``C(eps_j) = mean_i [d_i <= eps_j]`` for each size, vectorized."""
    def statistic(x: np.ndarray, axis: int = -1) -> np.ndarray:
        x = np.moveaxis(x, axis, -1)  # (..., N)
        return np.moveaxis((x[..., None] <= eps).mean(axis=-2), -1, 0)  # (J, ...)
    return statistic


def curve_band(d, eps: Iterable[float], seed: int = SEED) -> tuple[list[float], list[float]]:
    """``(low, high)``: the pointwise 95% interval of the error curve ``C`` at each of
    ``eps`` (the curve's own grid: its shaded band)."""
    # no stand-in for +inf here: an unbroken image is above every size (inf <= eps is False)
    raw = np.asarray(d, dtype=np.float64)
    eps = np.asarray(list(eps), dtype=np.float64)
    if raw.size < 2:
        value = [float((raw <= e).mean()) for e in eps]
        return value, value
    # sizes rounded as curves.error_curve rounds them (float32 distances, float32 sizes)
    precision = np.float32 if np.asarray(d).dtype == np.float32 else np.float64
    eps = eps.astype(precision).astype(np.float64)
    low, high = _bootstrap((raw,), _fractions(eps), seed, paired=False)
    return low.tolist(), high.tolist()


def error_at_intervals(d, sizes: Iterable[float], seed: int = SEED) -> dict[str, list[float]]:
    """``{size_key(s): [low, high]}``: the 95% interval of the error at each size."""
    sizes = [float(s) for s in sizes]
    low, high = curve_band(d, sizes, seed)
    return {size_key(s): [lo, hi] for s, lo, hi in zip(sizes, low, high)}


def proportion_interval(wrong, seed: int = SEED) -> list[float] | None:
    """``[low, high]``: the 95% interval of a fraction (the clean error: ``wrong`` is 0/1
    per image)."""
    x = np.asarray(wrong, dtype=np.float64)
    if x.size < 2:
        return None
    low, high = _bootstrap((x,), lambda s, axis=-1: s.mean(axis=axis), seed, paired=False)
    return [float(low), float(high)]


def clean_error_interval(error: float, n: int, seed: int = SEED) -> list[float] | None:
    """``proportion_interval`` of an error rate known as a fraction of ``n`` images (the
    whole test split's, from Lightning's accuracy): the bootstrap of a mean of 0/1 values
    depends only on how many are 1, ``round(error * n)``."""
    wrong = int(round(error * n))
    return proportion_interval(np.r_[np.ones(wrong), np.zeros(n - wrong)], seed)


def _ratio(stand_in: float) -> Callable:
    """The statistic ``median(a) / median(b)`` (lower medians) of distances whose +inf is
    ``stand_in``: a median at the stand-in is +inf again, so inf / finite = inf,
    finite / inf = 0 and inf / inf (like 0 / 0) = 1."""
    def statistic(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        ma, mb = (np.where(m >= stand_in, np.inf, m)
                  for m in (lower_median(a, axis), lower_median(b, axis)))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ma == mb, 1.0, ma / mb)
    return statistic


def paired_ratio(d_a, d_b, seed: int = SEED) -> dict:
    """The ratio of the median distances of two evaluations of the SAME images (``d_a``,
    ``d_b``, image by image), ``median(d_a) / median(d_b)``, with its paired 95% bootstrap
    interval (the images resampled jointly) and whether it excludes 1: ``{"ratio",
    "interval", "differs"}``. A +inf median (more than half unbroken) gives a ratio of +inf
    or 0; the interval's bounds are quantiles of the resampled ratios taken without
    interpolation (``inverted_cdf``), so +inf never enters an arithmetic."""
    a, b = np.asarray(d_a, dtype=np.float64), np.asarray(d_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired distances must be two 1-D arrays of one length, got "
                         f"{a.shape} and {b.shape}")
    both, top = _finite_stand_in(np.concatenate([a, b]))
    statistic = _ratio(2 * top + 1.0)
    a, b = both[:a.size], both[a.size:]
    ratio = float(statistic(a, b))
    if a.size < 2:
        return {"ratio": ratio, "interval": None, "differs": False}
    with np.errstate(invalid="ignore"):  # SciPy's standard error of +inf ratios: nan, unused
        result = stats.bootstrap((a, b), statistic, n_resamples=N_RESAMPLES,
                                 confidence_level=CONFIDENCE, method=METHOD, paired=True,
                                 vectorized=True, rng=np.random.default_rng(seed))
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(result.bootstrap_distribution, [tail, 1 - tail],
                            method="inverted_cdf")
    interval = [float(low), float(high)]
    return {"ratio": ratio, "interval": interval,
            "differs": bool(interval[0] > 1.0 or interval[1] < 1.0)}


def over_seeds(values: Iterable[float]) -> dict:
    """Mean, sample standard deviation and the 95% t interval of the mean of one number over
    seeds, ``mean +- t_{0.975, k-1} std / sqrt(k)`` (k seeds; None below 2 or with a
    non-finite value): ``{"mean", "std", "interval", "n_seeds"}``."""
    x = np.asarray(list(values), dtype=np.float64)
    out: dict = {"mean": float(x.mean()) if x.size else None, "std": None, "interval": None,
                 "n_seeds": int(x.size)}
    if x.size < 2 or not np.isfinite(x).all():
        return out
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, x.size - 1)) * std / math.sqrt(x.size)
    return out | {"std": std, "interval": [out["mean"] - half, out["mean"] + half]}


def optimality(d_attack, d_best) -> float:
    """How close an attack's robust-accuracy curve comes to the per-image best envelope (as
    AttackBench's optimality, Cina et al. 2024): with ``rho(eps) = #{i : d_i > eps} / N``
    and ``eps_max`` the largest finite best distance,

        optimality = int_0^eps_max rho_best / int_0^eps_max rho_attack
                   = sum_i min(d_best_i, eps_max) / sum_i min(d_attack_i, eps_max),

    1.0 when the attack found the best example for every image, smaller the more its curve
    lies above the envelope (``d_attack >= d_best`` image by image). 1.0 when no image has
    a positive finite best distance (nothing to find)."""
    a, best = np.asarray(d_attack, dtype=np.float64), np.asarray(d_best, dtype=np.float64)
    finite = best[np.isfinite(best)]
    eps_max = float(finite.max()) if finite.size else 0.0
    area_best, area = np.minimum(best, eps_max).sum(), np.minimum(a, eps_max).sum()
    return 1.0 if area <= 0 else float(area_best / area)


def with_intervals(entry: Mapping, d, sizes: Iterable[float], seed: int = SEED) -> dict:
    """A ``curves.summarize`` entry of distances ``d`` with its intervals: ``median_interval``,
    ``error_at_interval`` and the curve's ``low``/``high`` band."""
    out = dict(entry)
    out["median_interval"] = median_interval(d, seed)
    out["error_at_interval"] = error_at_intervals(d, sizes, seed)
    if "curve" in entry:
        low, high = curve_band(d, entry["curve"]["eps"], seed)
        out["curve"] = {**entry["curve"], "low": low, "high": high}
    return out
