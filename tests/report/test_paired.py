"""The report's paired comparisons with the baseline row (lipexp.report.paired) and its
cells with intervals (lipexp.report.columns)."""

import math

import numpy as np

from lipexp.evaluation.intervals import paired_ratio
from lipexp.files import save_npz_atomic
from lipexp.report.columns import ADVERSARIAL, Stat, aggregate, format_cell
from lipexp.report.paired import baseline_ratios, ratio_table
from lipexp.report.runs import Run


def run(folder, seed: int, distances: np.ndarray, indices=None) -> Run:
    """A completed run of ``seed`` whose distances.npz holds ``distances`` as its best known
    l2 distances."""
    folder.mkdir(parents=True)
    indices = np.arange(distances.size) if indices is None else indices
    save_npz_atomic(folder / "distances.npz", {"indices": indices, "ensemble_l2": distances})
    return Run(folder, "completed", {"config": {"seed": seed}})


def test_ratio_pairs_runs_of_one_seed_on_the_images_both_evaluated(tmp_path):
    """Seed by seed, over the common test images (the second defence's seed 1 evaluated
    images 10..109 only): the ratio is the paired ratio of the pooled pairs, marked where it
    excludes 1; the baseline's own row is 1."""
    rng = np.random.default_rng(0)
    base = {s: rng.exponential(size=120) for s in (0, 1)}
    stronger = {s: base[s] * 1.2 for s in (0, 1)}
    defences = {
        "J0": [run(tmp_path / f"j0_{s}", s, base[s]) for s in (0, 1)],
        "J2": [run(tmp_path / "j2_0", 0, stronger[0]),
               run(tmp_path / "j2_1", 1, stronger[1][10:110], np.arange(10, 110))],
        "J1": [run(tmp_path / "j1_5", 5, base[0])],  # no baseline run of seed 5
    }
    ratios = baseline_ratios(defences)
    expected = paired_ratio(np.r_[stronger[0], stronger[1][10:110]],
                            np.r_[base[0], base[1][10:110]])
    assert ratios["J2"]["ratio"] == expected["ratio"] and ratios["J2"]["differs"]
    assert ratios["J2"]["interval"] == expected["interval"]
    assert ratios["J2"]["n_images"] == 220 and ratios["J2"]["n_seeds"] == 2
    assert ratios["J0"]["ratio"] == 1.0 and not ratios["J0"]["differs"]
    assert ratios["J1"] is None
    table = "\n".join(ratio_table(ratios))
    assert "1.200" in table and " *" in table and "| J1 | — |" in table


def test_no_baseline_row_gives_no_ratios(tmp_path):
    assert baseline_ratios({"J2": [run(tmp_path / "a", 0, np.ones(5))]}) == {"J2": None}


def test_cells_show_the_interval_over_images_for_one_seed_and_over_seeds_for_several():
    """One run: its own bootstrap interval from results.json; several: the t interval of
    the mean over seeds (wider than the spread alone)."""
    stat = next(s for s in ADVERSARIAL if s.key == "l2_median")

    def results(median, low, high):
        return {"ensemble": {"l2": {"median": median, "n_unbroken": 0,
                                    "median_interval": [low, high]}}}

    one = aggregate([Run(None, "completed", results(0.5, 0.45, 0.56))], (stat,))["l2_median"]
    assert one["interval"] == [0.45, 0.56]
    assert format_cell(stat, one["mean"], one["std"], 1, 1, one["interval"]) == (
        "0.5 [0.45, 0.56]")
    many = aggregate([Run(None, "completed", results(m, 0, 1)) for m in (0.5, 0.52, 0.54)],
                     (stat,))["l2_median"]
    low, high = many["interval"]
    assert low < 0.52 - many["std"] and high > 0.52 + many["std"]
    unbroken = {"ensemble": {"l2": {"median": None, "n_unbroken": 9,
                                    "median_interval": [0.4, None]}}}
    cell = aggregate([Run(None, "completed", unbroken)], (stat,))["l2_median"]
    assert cell["mean"] == math.inf and cell["interval"] == [0.4, math.inf]


def test_runs_before_the_ensemble_fall_back_to_their_pgd_search():
    """A results.json of lipexp <= 0.4 (no ensemble): its l2_pgd median is the best known."""
    stat = next(s for s in ADVERSARIAL if s.key == "l2_median")
    old = {"attacks": {"l2_pgd": {"median": 0.7, "n_unbroken": 0}}}
    assert stat.get(old) == 0.7
    assert isinstance(stat, Stat) and stat.interval(old) is None


def test_a_baseline_trained_in_several_settings_pairs_each_row_with_its_own(tmp_path):
    """J0 and J2 each at two widths (rows named by the width, lipexp.report.runs): each J2
    row is compared with the J0 row of its width, and with none where J0 lacks its width."""
    rng = np.random.default_rng(1)
    defences, base = {}, {}
    for width in (8, 16):
        base[width] = rng.exponential(size=50)
        for name, factor in (("J0", 1.0), ("J2", 1.5 if width == 8 else 2.0)):
            r = run(tmp_path / f"{name}_{width}", 0, base[width] * factor)
            r.results["config"]["model"] = {"width": width}
            defences[f"{name} (model.width={width})"] = [r]
    ratios = baseline_ratios(defences)
    assert ratios["J2 (model.width=8)"]["ratio"] == paired_ratio(base[8] * 1.5, base[8])["ratio"]
    assert ratios["J2 (model.width=16)"]["ratio"] == paired_ratio(base[16] * 2, base[16])["ratio"]
    assert ratios["J0 (model.width=16)"]["ratio"] == 1.0
    del defences["J0 (model.width=16)"]  # no J0 of width 16: nothing to pair with, rather
    ratios = baseline_ratios(defences)  # than a ratio mixing the width with the defence
    assert ratios["J2 (model.width=16)"] is None
    assert ratios["J2 (model.width=8)"]["ratio"] == paired_ratio(base[8] * 1.5, base[8])["ratio"]
