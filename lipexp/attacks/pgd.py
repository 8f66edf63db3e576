"""Projected gradient descent (PGD; Madry et al. 2018): a fixed-size attack.

``PGD(norm, ...)(model, x, y, eps) -> (x_adv, success)`` attacks each image within its own
size ``eps_i``. One-step attacks are configs of the same loop (no random start, step = eps):

- FGSM: ``PGD(norm="linf", steps=1, rel_step=1.0, targets=0)``: ``clip(x + eps sign(g))``;
- the gradient attack: ``PGD(norm="l2", steps=1, rel_step=1.0, targets=0)``:
  ``clip(x + eps g / ||g||_2)``;

with ``g = grad_x CE(f(x), y)`` and ``clip`` the clamp to [0, 1] (for an image that is
misclassified clean the attack returns ``x`` itself, its smallest adversarial example).

Written here rather than taken from torchattacks' PGD / PGDL2: those take one size for the
whole batch (the distance search needs one per image), stop at the last iterate (this loop
keeps each image's smallest successful one) and have no targeted margin runs.

Cost per image that stays unbroken, default settings (20 steps, 9 targets): 1 + 10 * 21 + 1
= 212 forward and 10 * 20 = 200 backward passes (w.r.t. the input only); an image that breaks
in the untargeted run costs 1 + 21 + 1 forward and 20 backward passes.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipexp.attacks.threat import THREATS, Norm, ThreatModel
from lipexp.model_state import eval_mode


def to_norm(norm: Norm | str) -> Norm:
    """``Norm(norm)``, with a ValueError that lists the allowed values."""
    try:
        return Norm(norm)
    except ValueError:
        allowed = ", ".join(repr(n.value) for n in Norm)
        raise ValueError(f"norm must be one of {allowed}, got {norm!r}") from None


def _objective(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """The per-image quantity that the attack maximizes, (B,).

    Untargeted (``target`` None): the cross-entropy ``CE(z, y)``. Towards class ``t``: the
    pairwise margin ``z_t - z_y`` rather than ``z_t - max_{j != t} z_j``: success is
    ``argmax z != y``, which holds as soon as ``z_t > z_y`` for one ``t``, whereas the
    second margin aims at the smaller region where ``t`` is the argmax. For a linear model
    ``z_t - z_y`` is linear in the input, so l2 (l-infinity) PGD towards ``t`` reaches the
    nearest point of the half-space ``z_t >= z_y``, at distance
    ``(z_y - z_t) / ||w_y - w_t||_2`` (``_1``); the minimum over ``t`` is the exact
    adversarial distance. Neither margin saturates as the cross-entropy does (whose
    gradient underflows to 0 for confidently classified images).
    """
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return logits.gather(1, target[:, None])[:, 0] - logits.gather(1, y[:, None])[:, 0]


@dataclass(frozen=True)
class PGD:
    """PGD with ``steps`` steps of size ``rel_step * eps / steps`` in the threat model of
    ``norm`` (Madry et al.: 2.5 eps / steps, so an iterate can cross the ball and back).

    First an untargeted run maximizes the cross-entropy; then, for the images still
    unbroken, one run towards each of the ``targets`` wrong classes with the highest clean
    logits (at most classes - 1) maximizes ``z_t - z_y``. Success is checked at every
    iterate (start and final included), and each image keeps its successful iterate of
    smallest perturbation norm. The model is an argument, never stored.
    """

    norm: Norm | str
    steps: int = 20
    rel_step: float = 2.5
    targets: int = 9
    random_start: bool = False

    def __post_init__(self):
        object.__setattr__(self, "norm", to_norm(self.norm))
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.rel_step > 0:
            raise ValueError(f"rel_step must be > 0, got {self.rel_step}")
        if self.targets < 0:
            raise ValueError(f"targets must be >= 0, got {self.targets}")

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor | float
    ) -> tuple[Tensor, Tensor]:
        """Attack each image ``x_i`` within size ``eps_i`` (eps: (B,), or a number).

        Returns ``(x_adv, success)``: ``x_adv`` in [0, 1] with ``||x_adv - x|| <= eps`` (up
        to float rounding of the subtraction), the smallest successful iterate where there
        is one (``x`` for an image misclassified clean), else the last iterate of the
        untargeted run; ``success = model(x_adv).argmax(1) != y``, (B,) bool. An image with
        ``eps_i = 0`` is only checked clean. The model runs in eval mode (each submodule's
        mode is restored afterwards); only the input is differentiated, so the parameters'
        ``.grad`` and ``requires_grad`` are left as they were.
        """
        threat = THREATS[self.norm]
        eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:1])
        if not (eps >= 0).all():
            raise ValueError("eps must be >= 0 (and not NaN)")
        # Autograd also under a caller's inference_mode (Lightning's validation and test):
        # leave it, and clone the inputs, which may be inference tensors.
        with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
            x, y, eps = x.detach().clone(), y.clone(), eps.clone()
            x_out = x.clone()
            with torch.no_grad():
                logits = model(x)  # clean: error gives norm 0; logits rank the targets
            best = torch.where(logits.argmax(1) != y, 0.0, torch.inf).to(x.dtype)  # (B,)

            # Untargeted run on the images that are correct clean and have eps > 0.
            idx = (best.isinf() & (eps > 0)).nonzero()[:, 0]
            if idx.numel():
                last, x_best, norm = self._run(model, threat, x[idx], y[idx], eps[idx], None)
                hit = norm.isfinite()
                x_out[idx] = torch.where(hit.reshape(-1, *[1] * (x.dim() - 1)), x_best, last)
                best[idx] = norm

            # Targeted runs, each on the images still unbroken.
            k = min(self.targets, logits.shape[1] - 1)
            if k:
                wrong = logits.scatter(1, y[:, None], -torch.inf)  # (B, classes), y excluded
                ranked = wrong.topk(k, dim=1).indices  # (B, k), highest clean logit first
            for r in range(k):
                idx = (best.isinf() & (eps > 0)).nonzero()[:, 0]
                if not idx.numel():
                    break
                t = ranked[idx, r]
                _, x_best, norm = self._run(model, threat, x[idx], y[idx], eps[idx], t)
                hit = norm.isfinite()
                x_out[idx[hit]] = x_best[hit]
                best[idx[hit]] = norm[hit]

            # The returned points, checked afresh, in full precision even under a caller's
            # bf16 autocast: a success must not be an artefact of rounding.
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                success = model(x_out).argmax(1) != y
            return x_out, success

    def _run(
        self,
        model: nn.Module,
        threat: ThreatModel,
        x: Tensor,
        y: Tensor,
        eps: Tensor,
        target: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One PGD run: ``steps`` ascent steps of ``_objective``, each followed by the
        projection. Returns ``(last iterate, smallest successful iterate, its norm)``, the
        norm (B,) being +inf (and that iterate meaningless) where no iterate succeeded."""
        step_size = self.rel_step * eps / self.steps  # (B,), in units of the norm
        x_adv = threat.init(x, eps, self.random_start)
        x_best, best = x_adv, torch.full_like(eps, torch.inf)
        for i in range(self.steps + 1):
            # detach: a fresh leaf (never x itself), the only tensor differentiated
            x_adv = x_adv.detach().requires_grad_(i < self.steps)
            with torch.set_grad_enabled(i < self.steps):
                logits = model(x_adv)
            # Record success at this iterate from the same forward pass, then step.
            norm = threat.norm(x_adv.detach() - x)  # (B,)
            better = (logits.argmax(1) != y) & (norm < best)
            x_best = torch.where(better.reshape(-1, *[1] * (x.dim() - 1)), x_adv.detach(), x_best)
            best = torch.where(better, norm, best)
            if i == self.steps:
                break
            (g,) = torch.autograd.grad(_objective(logits, y, target).sum(), x_adv)
            x_adv = threat.project(threat.step(x_adv.detach(), g, step_size), x, eps)
        return x_adv.detach(), x_best, best
