"""Certified radii from a Lipschitz constant of the logits (docs/method.md, "Guarantees").

Let ``L`` bound the l2 Lipschitz constant of the whole logit vector,
``||f(x) - f(x')||_2 <= L ||x - x'||_2`` (``model_bounds.upper_bound`` gives one), ``y`` the
true class and ``m_j(x) = f_y(x) - f_j(x)`` the margin to class ``j``. Then for every
perturbation ``delta``

    |m_j(x + delta) - m_j(x)| = |<e_y - e_j, f(x + delta) - f(x)>|
                              <= ||e_y - e_j||_2 L ||delta||_2 = sqrt(2) L ||delta||_2

(Cauchy-Schwarz), so every margin stays positive, and the prediction stays ``y``, while
``||delta||_2 < min_j m_j(x) / (sqrt(2) L)``. That is the certified l2 radius
``r = max(0, z_y - max_{j != y} z_j) / (sqrt(2) L)`` (0 for an image misclassified clean).
No attack can succeed below it, so ``r_i <= d_i`` for every adversarial distance ``d_i``
an attack finds: a larger radius would mean a bug. In l-infinity,
``||delta||_2 <= sqrt(n) ||delta||_inf`` gives the radius ``r / sqrt(n)`` (n = C*H*W).

The certified error curve ``#{i : r_i <= eps} / N`` is the fraction of images NOT certified
at size ``eps``: an upper bound on the error of any attack of that size (the curves of
``lipexp.evaluation.curves`` apply to radii as to distances).
"""

import math

import torch
from torch import Tensor


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j`` for each row of ``logits`` (B, K): (B,); <= 0 when wrong."""
    z_y = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -torch.inf)
    return z_y - others.max(dim=1).values


def radii_from_margins(margin: Tensor, lipschitz_l2: float) -> Tensor:
    """The certified l2 radius ``max(0, margin) / (sqrt(2) L)`` of each image, (B,)."""
    if not lipschitz_l2 > 0:
        raise ValueError(f"the Lipschitz constant must be > 0, got {lipschitz_l2}")
    return margin.clamp_min(0.0) / (math.sqrt(2.0) * lipschitz_l2)


def certified_radii(logits: Tensor, y: Tensor, lipschitz_l2: float) -> Tensor:
    """The certified l2 radius of each image from its logits (B, K) and labels (B,)."""
    return radii_from_margins(margins(logits, y), lipschitz_l2)


def linf_radii(l2_radii: Tensor, input_dim: int) -> Tensor:
    """l-infinity radii from l2 ones: ``r / sqrt(n)``, as ``||d||_2 <= sqrt(n) ||d||_inf``."""
    return l2_radii / math.sqrt(input_dim)
