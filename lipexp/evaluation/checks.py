"""Self-checks of an evaluation for the usual signs of gradient masking (Athalye et al.
2018; docs/method.md, "Evaluation protocol"), one function per check, as AutoAttack's
``checks.py``. Each check returns a list of warnings (empty: passed); ``run_checks``
composes them into results.json's ``checks`` entry.
"""

from collections.abc import Mapping

import numpy as np
from torch import Tensor

from lipexp.evaluation.distance_attacks import DistanceAttack

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
            "images: gradient-based attacks may be masked"]


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
                                "is too weak or gradients are masked")
    return warnings


def run_checks(attacks: Mapping[str, DistanceAttack], distances: Mapping[str, np.ndarray],
               per_example: Mapping[str, Tensor], clean_wrong: Tensor) -> dict:
    """``{"warnings": [...], "vanishing_gradient_fraction": float | None}``, results.json's
    ``checks``: every check's warnings, and the fraction of vanished input gradients."""
    return {
        "warnings": (vanishing_gradients(per_example, clean_wrong)
                     + weak_attack_beats_reference(attacks, distances)),
        "vanishing_gradient_fraction": vanishing_gradient_fraction(per_example, clean_wrong),
    }
