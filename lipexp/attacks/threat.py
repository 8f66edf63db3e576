"""Threat models: the norm ball around an image intersected with the pixel box [0, 1].

Kept apart from the attack loop (as MadryLab/robustness does): a threat model says how to
measure, start, step and project; the loop (pgd.py) is the same for every norm. All methods
are batched: ``x`` is (B, ...), and sizes ``eps`` and step sizes are per image, shape (B,),
broadcast over the other dimensions (a Python float is broadcast as it is).
"""

from abc import ABC, abstractmethod
from enum import Enum

import torch
from torch import Tensor


class Norm(str, Enum):
    l2 = "l2"
    linf = "linf"


def _per_image(v: Tensor | float, x: Tensor) -> Tensor | float:
    """(B,) -> (B, 1, ..., 1), to broadcast a per-image size over ``x``'s other dims."""
    return v.reshape(-1, *[1] * (x.dim() - 1)) if isinstance(v, Tensor) else v


class ThreatModel(ABC):
    """The set ``{x' : ||x' - x|| <= eps, 0 <= x' <= 1}`` for one norm."""

    @abstractmethod
    def norm(self, delta: Tensor) -> Tensor:
        """``||delta_i||`` for each image: (B, ...) -> (B,)."""

    @abstractmethod
    def dual_norm(self, grad: Tensor) -> Tensor:
        """``||grad_i||_*`` for each image, the dual norm, (B, ...) -> (B,): the largest
        first-order change ``<grad_i, delta>`` over ``||delta|| <= 1``."""

    @abstractmethod
    def init(self, x: Tensor, eps: Tensor, random: bool) -> Tensor:
        """The start of an attack: ``x`` itself, or (``random``) a random point of the set."""

    @abstractmethod
    def step(self, x_adv: Tensor, grad: Tensor, step_size: Tensor | float) -> Tensor:
        """One ascent step of length ``step_size`` (in this norm) along ``grad``."""

    @abstractmethod
    def project(self, x_adv: Tensor, x: Tensor, eps: Tensor) -> Tensor:
        """A point of the set near ``x_adv``: ``||result - x|| <= eps``, values in [0, 1]."""


class L2(ThreatModel):
    def norm(self, delta: Tensor) -> Tensor:
        """``||delta_i||_2 = sqrt(sum_k delta_ik^2)``."""
        return torch.linalg.vector_norm(delta.flatten(1), ord=2, dim=1)

    def dual_norm(self, grad: Tensor) -> Tensor:
        """``||g_i||_2``: l2 is its own dual."""
        return self.norm(grad)

    def init(self, x: Tensor, eps: Tensor, random: bool) -> Tensor:
        """``x``, or ``x + r u`` clamped to [0, 1]: ``u`` uniform on the unit sphere (a
        normalized Gaussian), ``r = eps * U^(1/n)``, U uniform in [0, 1], ``n`` = C*H*W, so
        the point is uniform in the ball; the clamp keeps it in the ball (it moves every
        coordinate towards ``x``) but makes it only roughly uniform where the box binds."""
        if not random:
            return x
        u = torch.randn_like(x)
        u = u / _per_image(self.norm(u).clamp_min(torch.finfo(u.dtype).tiny), x)
        r = eps * torch.rand_like(eps) ** (1.0 / x[0].numel())  # (B,)
        return self.project(x + _per_image(r, x) * u, x, eps)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: Tensor | float) -> Tensor:
        """``x_adv + step_size * g / ||g||_2`` (an image with ``g = 0`` does not move)."""
        g_norm = self.norm(grad).clamp_min(torch.finfo(grad.dtype).tiny)  # safe divide
        return x_adv + _per_image(step_size, x_adv) * grad / _per_image(g_norm, grad)

    def project(self, x_adv: Tensor, x: Tensor, eps: Tensor) -> Tensor:
        """``x + delta * min(1, eps / ||delta||_2)`` with ``delta = x_adv - x``, then the
        clamp to [0, 1].

        Ball then box is not the exact projection onto their intersection, but it is the
        standard one (Madry et al., robustness, foolbox), and the result lies in both sets:
        ``x`` is in [0, 1], so the clamp only moves coordinates towards ``x`` and the l2
        norm of the perturbation can only shrink.
        """
        delta = x_adv - x
        n = self.norm(delta).clamp_min(torch.finfo(delta.dtype).tiny)  # safe divide
        scale = (eps / n).clamp_max(1.0)  # (B,)
        return (x + _per_image(scale, x) * delta).clamp(0.0, 1.0)


class Linf(ThreatModel):
    def norm(self, delta: Tensor) -> Tensor:
        """``||delta_i||_inf = max_k |delta_ik|``."""
        return delta.flatten(1).abs().amax(dim=1)

    def dual_norm(self, grad: Tensor) -> Tensor:
        """``||g_i||_1 = sum_k |g_ik|``, the dual of l-infinity."""
        return grad.flatten(1).abs().sum(dim=1)

    def init(self, x: Tensor, eps: Tensor, random: bool) -> Tensor:
        """``x``, or a point uniform in the intersection of the cube with [0, 1], itself a
        box: ``[max(x - eps, 0), min(x + eps, 1)]`` coordinate by coordinate."""
        if not random:
            return x
        e = _per_image(eps, x)
        lo, hi = (x - e).clamp_min(0.0), (x + e).clamp_max(1.0)
        return self.project(lo + (hi - lo) * torch.rand_like(x), x, eps)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: Tensor | float) -> Tensor:
        """``x_adv + step_size * sign(g)``, the steepest ascent step in l-infinity."""
        return x_adv + _per_image(step_size, x_adv) * grad.sign()

    def project(self, x_adv: Tensor, x: Tensor, eps: Tensor) -> Tensor:
        """``x + clamp(x_adv - x, -eps, eps)``, then the clamp to [0, 1] (here exact: both
        sets are boxes)."""
        e = _per_image(eps, x)
        return (x + (x_adv - x).clamp(-e, e)).clamp(0.0, 1.0)


THREATS: dict[Norm, ThreatModel] = {Norm.l2: L2(), Norm.linf: Linf()}
