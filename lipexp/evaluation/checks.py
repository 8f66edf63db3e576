"""Self-checks of an evaluation for the usual signs of gradient masking (Athalye et al.
2018; docs/method.md, "Evaluation protocol"), one function per check, as AutoAttack's
``checks.py``. Each check returns a list of warnings (empty: passed); ``run_checks``
composes them into results.json's ``checks`` entry.
"""

import math
from collections.abc import Mapping

import numpy as np
from torch import Tensor

from lipexp.attacks.distance import DistanceAttack
from lipexp.evaluation.curves import median_distance

MEDIAN_GAP = 0.05  # an attack whose median is this far below PGD's (relative) signals trouble
VANISHING = 1e-12  # an input gradient below this l2 norm counts as vanished
MAX_VANISHED = 0.01  # largest fraction of vanished gradients that passes


def vanishing_gradient_fraction(per_example: Mapping[str, Tensor], clean_wrong: Tensor,
                                threshold: float = VANISHING) -> float | None:
    """``#{i correct : ||grad_x l(x_i)||_2 < threshold} / #{i correct}`` over the correctly
    classified images (None when there is none: no fraction to report);
    ``per_example["grad_loss_l2"]`` (N,) and ``clean_wrong`` (N,) bool, as stability.py and
    the clean check give them."""
    correct = ~clean_wrong
    if not correct.any():
        return None
    return (per_example["grad_loss_l2"][correct] < threshold).double().mean().item()


def vanishing_gradients(per_example: Mapping[str, Tensor], clean_wrong: Tensor,
                        threshold: float = VANISHING) -> list[str]:
    """A warning, with the fraction, when the input gradient of the loss vanishes on more
    than 1% of the correctly classified images: gradient-based attacks then see no way up."""
    vanished = vanishing_gradient_fraction(per_example, clean_wrong, threshold)
    if vanished is None or vanished <= MAX_VANISHED:  # None: no correctly classified image
        return []
    return [f"the input gradient vanishes on {100 * vanished:.1f}% of correctly classified "
            "images: gradient-based attacks may be masked "
            "(see docs/evaluation.md#vanishing-input-gradients)"]


def weak_attack_beats_reference(attacks: Mapping[str, DistanceAttack],
                                distances: Mapping[str, np.ndarray]) -> list[str]:
    """A warning for each ``weak`` attack that breaks more images than a ``reference`` attack
    of its norm at some size: ``#{i : d_weak_i <= eps} > #{i : d_ref_i <= eps}`` for an eps
    among the weak attack's finite positive distances (the sizes where its count grows).
    The white-box attack is then too weak, or the gradients are masked. No reference of a
    norm: nothing to compare."""
    warnings = []
    for name, attack in attacks.items():
        if not attack.weak:
            continue
        weak = distances[name]
        for ref_name, ref_attack in attacks.items():
            if not ref_attack.reference or ref_attack.norm != attack.norm:
                continue
            ref = distances[ref_name]
            sizes = np.unique(weak[np.isfinite(weak) & (weak > 0)])
            beaten = next((s for s in sizes if (weak <= s).sum() > (ref <= s).sum()), None)
            if beaten is not None:
                warnings.append(f"{name} breaks more images than {ref_name} at "
                                f"{attack.norm.value} size {beaten:.4g}: the white-box attack "
                                "is too weak or gradients are masked "
                                "(see docs/evaluation.md#a-weak-attack-breaks-more-images)")
    return warnings


def attack_beats_reference_median(attacks: Mapping[str, DistanceAttack],
                                  distances: Mapping[str, np.ndarray],
                                  gap: float = MEDIAN_GAP) -> list[str]:
    """A warning for each attack with a median (not a fixed-size check) whose median
    distance is more than ``gap`` below the reference attack's of its norm:
    ``median_a < (1 - gap) * median_ref`` (an infinite reference median is beaten by any
    finite one). PGD's search should find about the smallest examples; an attack that does
    much better (FMN, CW, DeepFool) means PGD is too weak here or its gradients are masked,
    and the reference's numbers should not be cited alone."""
    warnings = []
    for name, attack in attacks.items():
        if attack.reference or attack.fixed_size is not None:
            continue
        median = median_distance(distances[name])
        for ref_name, ref_attack in attacks.items():
            if not ref_attack.reference or ref_attack.norm != attack.norm:
                continue
            ref = median_distance(distances[ref_name])
            if median < (1 - gap) * ref:
                theirs = "+inf" if math.isinf(ref) else f"{ref:.4g}"
                warnings.append(f"{name}'s median {attack.norm.value} distance {median:.4g} is "
                                f"more than {gap:.0%} below {ref_name}'s {theirs}: PGD is too "
                                "weak on this model or its gradients are masked "
                                "(see docs/evaluation.md#a-median-below-the-reference)")
    return warnings


def run_checks(attacks: Mapping[str, DistanceAttack], distances: Mapping[str, np.ndarray],
               per_example: Mapping[str, Tensor], clean_wrong: Tensor) -> dict:
    """``{"warnings": [...], "vanishing_gradient_fraction": float | None}``, results.json's
    ``checks``: every check's warnings, and the fraction of vanished input gradients."""
    return {
        "warnings": (vanishing_gradients(per_example, clean_wrong)
                     + weak_attack_beats_reference(attacks, distances)
                     + attack_beats_reference_median(attacks, distances)),
        "vanishing_gradient_fraction": vanishing_gradient_fraction(per_example, clean_wrong),
    }
