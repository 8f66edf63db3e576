"""Intervals of the evaluation's numbers (lipexp.evaluation.intervals), the best known
distance as the headline, each attack's gap and optimality (lipexp.evaluation.ensemble)."""

import math

import numpy as np
import pytest
from scipy import stats

from lipexp.attacks.distance import FMNAttack, PGDSearch
from lipexp.attacks.threat import Norm
from lipexp.evaluation import intervals
from lipexp.evaluation.curves import error_curve, median_distance
from lipexp.evaluation.evaluate import evaluate
from lipexp.evaluation.summary import headline, metrics

from ..helpers import linear_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def test_median_interval_covers_the_true_median_at_its_level():
    """On 200 seeded draws of 150 exponential distances (true median ln 2), the 95%
    interval covers the true median in 88-99% of the draws (binomial sd of the rate at
    200 draws: 1.5%)."""
    rng = np.random.default_rng(0)
    covered = 0
    for seed in range(200):
        low, high = intervals.median_interval(rng.exponential(size=150), seed=seed)
        covered += low <= math.log(2) <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_error_interval_covers_the_true_error_and_the_band_holds_the_curve():
    """The error at a size is a fraction: its interval covers the true C(eps) at the level;
    the curve's band holds the curve itself at every grid point."""
    rng = np.random.default_rng(1)
    true = 1 - math.exp(-0.5)  # C(0.5) of Exp(1)
    covered = sum(low <= true <= high for seed in range(200)
                  for low, high in [intervals.error_at_intervals(
                      rng.exponential(size=120), [0.5], seed=seed)["0.5"]])
    assert 0.88 <= covered / 200 <= 0.99
    d = rng.exponential(size=80)
    grid = np.geomspace(0.01, 5, 30)
    low, high = intervals.curve_band(d, grid)
    curve = error_curve(d, grid)
    assert (np.array(low) <= curve + 1e-12).all() and (curve <= np.array(high) + 1e-12).all()


def test_unbroken_images_keep_an_infinite_median_and_bound():
    """More than half the images unbroken: the median and its upper bound are +inf; a
    quarter unbroken: finite bounds, within the finite distances."""
    d = np.r_[np.full(60, np.inf), np.linspace(0.1, 1.0, 40)]
    assert median_distance(d) == math.inf
    assert intervals.median_interval(d)[1] == math.inf
    d = np.r_[np.full(25, np.inf), np.linspace(0.1, 1.0, 75)]
    low, high = intervals.median_interval(d)
    assert 0.1 <= low <= median_distance(d) <= high <= 1.0


def test_paired_ratio_excludes_one_for_a_shifted_copy_and_includes_it_for_the_same():
    """The same distances: ratio 1, interval holds 1, no difference. A copy 5% larger with
    1% noise per image, paired on the images: its interval excludes 1 although the two
    samples' own median intervals overlap (pairing removes the images' variation)."""
    rng = np.random.default_rng(2)
    d = rng.exponential(size=200)
    same = intervals.paired_ratio(d, d.copy())
    assert same["ratio"] == 1.0 and same["interval"][0] <= 1.0 <= same["interval"][1]
    assert not same["differs"]
    shifted = d * 1.05 * np.exp(0.01 * rng.standard_normal(200))
    result = intervals.paired_ratio(shifted, d)
    assert result["differs"] and result["interval"][0] > 1.0
    assert result["interval"][0] <= result["ratio"] <= result["interval"][1]
    own, base = intervals.median_interval(shifted), intervals.median_interval(d)
    assert own[0] < base[1]  # unpaired, the intervals overlap


def test_unbroken_images_are_never_counted_broken_and_an_unbroken_median_has_no_ratio():
    """+inf distances stay above every size: the error at a size beyond every finite
    distance is the broken fraction (70%), not 100%; a median that is +inf (60% unbroken)
    over a finite one is +inf, and the other way 0, never a finite stand-in's ratio."""
    d = np.r_[np.linspace(0.01, 0.2, 70), np.full(30, np.inf)]
    low, high = intervals.error_at_intervals(d, [1.5])["1.5"]
    assert low <= 0.7 <= high < 1.0
    assert intervals.curve_band(np.full(10, np.inf), [1.5]) == ([0.0], [0.0])
    unbroken = np.r_[np.full(60, np.inf), np.linspace(0.01, 0.2, 40)]
    finite = np.linspace(0.01, 0.2, 100)
    over = intervals.paired_ratio(unbroken, finite)
    assert over["ratio"] == math.inf and over["interval"][0] > 1 and over["differs"]
    assert intervals.paired_ratio(finite, unbroken)["ratio"] == 0.0


def test_paired_ratio_refuses_unpaired_shapes():
    with pytest.raises(ValueError, match="one length"):
        intervals.paired_ratio(np.ones(3), np.ones(4))


def test_over_seeds_is_the_t_interval_of_the_mean():
    values = [0.51, 0.55, 0.49, 0.53]
    out = intervals.over_seeds(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                scale=stats.sem(values))
    assert out["interval"] == pytest.approx(list(expected), rel=1e-12)
    assert out["std"] == pytest.approx(np.std(values, ddof=1))
    assert intervals.over_seeds([0.5])["interval"] is None


def test_clean_error_interval_is_the_bootstrap_of_the_images_mistakes():
    wrong = np.r_[np.ones(7), np.zeros(93)]
    assert intervals.clean_error_interval(0.07, 100) == intervals.proportion_interval(wrong)
    low, high = intervals.clean_error_interval(0.07, 100)
    assert low < 0.07 < high


def test_optimality_is_one_for_the_best_and_below_for_a_weaker_attack():
    """An attack that found the best example for every image: 1.0; one 10% weaker on every
    image: the ratio of the areas, below 1 (about 1 / 1.1, the largest images capped at
    eps_max); one that breaks nothing: lower still."""
    rng = np.random.default_rng(3)
    best = np.r_[0.0, 0.0, rng.exponential(size=98)]  # two misclassified clean
    assert intervals.optimality(best, best) == 1.0
    weaker = intervals.optimality(best * 1.1, best)
    assert 0.9 < weaker < 0.95
    assert intervals.optimality(np.full(100, np.inf), best) < weaker


def test_headline_is_the_per_image_minimum_over_two_attacks():
    """A run with PGD and FMN for l2: the headline median (results' ensemble, W&B
    test/l2_median, the summary line) is the lower median of the per-image minimum of the
    two attacks' distances; each attack's gap is its median over it minus 1 (>= 0), its
    optimality 1 only where it is the minimum everywhere."""
    model, x, y, _ = linear_problem(n=30)
    attacks = {"l2_pgd": PGDSearch("l2", steps=5), "l2_fmn": FMNAttack("l2", steps=10)}
    ev = evaluate(model, x, y, attacks, error_at_sizes={Norm.l2: [0.1], Norm.linf: []})
    best = np.minimum(ev.distances["l2_pgd"], ev.distances["l2_fmn"])
    entry = ev.results["ensemble"]["l2"]
    assert entry["median"] == pytest.approx(median_distance(best), rel=1e-12)
    assert np.array_equal(ev.distances["ensemble_l2"], best)
    numbers = metrics(ev.results)
    assert numbers["test/l2_median"] == entry["median"]
    assert numbers["test/l2_median_low"] <= entry["median"] <= numbers["test/l2_median_high"]
    for name in attacks:
        median = ev.results["attacks"][name]["median"]
        assert entry["gap"][name] == pytest.approx(median / entry["median"] - 1)
        assert entry["gap"][name] >= 0 and numbers[f"test/{name}_gap"] == entry["gap"][name]
        everywhere = bool((ev.distances[name] == best).all())
        assert (entry["optimality"][name] == 1.0) == everywhere
    assert f"best known median l2 {entry['median']:.4g}" in headline(ev.results)
    interval = ev.results["evaluation"]["clean_error_interval"]
    assert interval[0] <= ev.results["evaluation"]["clean_error"] <= interval[1]
