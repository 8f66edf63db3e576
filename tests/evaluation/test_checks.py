"""The gradient-masking self-checks (lipexp.evaluation.checks), one check at a time, on
hand-made inputs."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lipexp.attacks.distance import (
    AutoAttack,
    DeepFool,
    DistanceAttack,
    FMNAttack,
    PGDSearch,
    SquareGrid,
)
from lipexp.attacks.threat import Norm
from lipexp.evaluation.checks import (
    attack_beats_reference_median,
    run_checks,
    vanishing_gradient_fraction,
    vanishing_gradients,
    weak_attack_beats_reference,
)

INF = math.inf
REFERENCE_L2 = PGDSearch("l2", steps=20)
GRADIENT_L2 = PGDSearch("l2", steps=1, rel_step=1.0, targets=0)  # weak
REF_D = np.array([0.0, 0.5, 1.0, 2.0, INF], dtype=np.float32)


def gradients(n_correct: int, n_vanished: int, n_wrong: int = 0):
    """``per_example`` and ``clean_wrong``: ``n_vanished`` of the correct images have a zero
    input gradient; the wrong images all have one (they must not count)."""
    g = torch.ones(n_correct + n_wrong)
    g[:n_vanished] = 0.0
    g[n_correct:] = 0.0
    wrong = torch.arange(n_correct + n_wrong) >= n_correct
    return {"grad_loss_l2": g}, wrong


@pytest.mark.parametrize(("n_correct", "n_vanished", "flagged"),
                         [(100, 2, True), (200, 1, False), (100, 1, False), (100, 0, False)])
def test_vanishing_gradients_above_one_percent(n_correct, n_vanished, flagged):
    per_example, wrong = gradients(n_correct, n_vanished, n_wrong=50)
    fraction = n_vanished / n_correct
    assert vanishing_gradient_fraction(per_example, wrong) == pytest.approx(fraction)
    warnings = vanishing_gradients(per_example, wrong)
    assert bool(warnings) == flagged
    if flagged:
        assert f"{100 * fraction:.1f}%" in warnings[0] and "vanishes" in warnings[0]


def test_vanishing_threshold_and_no_correct_image():
    per_example = {"grad_loss_l2": torch.tensor([1e-13, 1e-6, 1.0, 1.0])}
    wrong = torch.zeros(4, dtype=torch.bool)
    assert vanishing_gradient_fraction(per_example, wrong) == 0.25
    assert vanishing_gradient_fraction(per_example, wrong, threshold=1e-5) == 0.5
    assert vanishing_gradients(per_example, wrong, threshold=1e-5)
    everything_wrong = torch.ones(4, dtype=torch.bool)
    assert vanishing_gradient_fraction(per_example, everything_wrong) is None
    assert vanishing_gradients(per_example, everything_wrong) == []


def test_weak_attack_with_smaller_distances_is_flagged():
    attacks = {"l2_pgd": REFERENCE_L2, "l2_gradient": GRADIENT_L2}
    weak = np.array([0.0, 0.4, 1.0, 2.0, INF], dtype=np.float32)  # breaks image 1 earlier
    (warning,) = weak_attack_beats_reference(attacks, {"l2_pgd": REF_D, "l2_gradient": weak})
    assert "l2_gradient breaks more images than l2_pgd" in warning and "0.4" in warning


def test_weak_attack_with_larger_distances_passes():
    attacks = {"l2_pgd": REFERENCE_L2, "l2_gradient": GRADIENT_L2}
    weak = np.array([0.0, 0.6, 1.0, INF, INF], dtype=np.float32)
    assert weak_attack_beats_reference(attacks, {"l2_pgd": REF_D, "l2_gradient": weak}) == []
    same = {"l2_pgd": REF_D, "l2_gradient": REF_D.copy()}  # equal is not beating
    assert weak_attack_beats_reference(attacks, same) == []


def test_only_a_reference_of_the_same_norm_is_compared():
    tiny = np.array([0.0, 1e-3, 1e-3, 1e-3, 1e-3], dtype=np.float32)
    # linf Square against an l2 reference: no linf reference, no comparison
    attacks = {"l2_pgd": REFERENCE_L2, "linf_square": SquareGrid()}
    assert weak_attack_beats_reference(attacks, {"l2_pgd": REF_D, "linf_square": tiny}) == []
    # DeepFool is neither weak nor a reference: never compared, however small its distances
    attacks = {"l2_pgd": REFERENCE_L2, "l2_deepfool": DeepFool()}
    assert weak_attack_beats_reference(attacks, {"l2_pgd": REF_D, "l2_deepfool": tiny}) == []
    # a one-step attack without an iterative PGD of its norm: nothing to compare
    assert weak_attack_beats_reference({"l2_gradient": GRADIENT_L2}, {"l2_gradient": tiny}) == []


@dataclass(frozen=True)
class DeclaredWeak(DistanceAttack):
    """Any attack that declares itself weak is checked: no class is singled out."""

    norm: Norm = Norm.l2
    weak = True

    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError


def test_the_declared_flag_decides():
    tiny = np.array([0.0, 1e-3, 1e-3, 1e-3, 1e-3], dtype=np.float32)
    attacks = {"l2_pgd": REFERENCE_L2, "mine": DeclaredWeak()}
    assert len(weak_attack_beats_reference(attacks, {"l2_pgd": REF_D, "mine": tiny})) == 1


def test_run_checks_composes_every_check():
    per_example, wrong = gradients(100, 5)
    weak = np.array([0.0, 0.4, 1.0, 2.0, INF], dtype=np.float32)
    checks = run_checks({"l2_pgd": REFERENCE_L2, "l2_gradient": GRADIENT_L2},
                        {"l2_pgd": REF_D, "l2_gradient": weak}, per_example, wrong)
    assert set(checks) == {"warnings", "vanishing_gradient_fraction"}
    assert checks["vanishing_gradient_fraction"] == pytest.approx(0.05)
    assert [w.split()[0] for w in checks["warnings"]] == ["the", "l2_gradient"]
    clean = run_checks({"l2_pgd": REFERENCE_L2}, {"l2_pgd": REF_D}, *gradients(10, 0))
    assert clean == {"warnings": [], "vanishing_gradient_fraction": 0.0}


# REF_D's lower median is 1.0 (the third of five)
@pytest.mark.parametrize(("median", "flagged"), [(0.94, True), (0.96, False), (1.2, False),
                                                 (INF, False)])
def test_an_attack_more_than_5_percent_below_pgd_in_median_is_flagged(median, flagged):
    other = np.array([0.0, 0.1, median, 3.0, INF], dtype=np.float32)
    warnings = attack_beats_reference_median(
        {"l2_pgd": REFERENCE_L2, "l2_fmn": FMNAttack("l2")}, {"l2_pgd": REF_D, "l2_fmn": other})
    assert len(warnings) == flagged
    if flagged:
        assert warnings[0].startswith("l2_fmn's median l2 distance 0.94 is more than 5% below "
                                      "l2_pgd's 1")


def test_the_median_check_compares_within_a_norm_and_skips_fixed_size_checks():
    small = np.array([0.0, 0.1, 0.2, 0.3, INF], dtype=np.float32)
    unbroken = np.array([0.0, INF, INF, INF, INF], dtype=np.float32)
    attacks = {"l2_pgd": REFERENCE_L2, "linf_fmn": FMNAttack("linf"),
               "linf_autoattack": AutoAttack(), "l2_deepfool": DeepFool()}
    d = {"l2_pgd": unbroken, "linf_fmn": small, "linf_autoattack": small,
         "l2_deepfool": small}
    # linf attacks: no linf reference; an infinite PGD median is beaten by a finite one
    (warning,) = attack_beats_reference_median(attacks, d)
    assert warning.startswith("l2_deepfool's") and "l2_pgd's +inf" in warning
