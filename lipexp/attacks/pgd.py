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

Cost per image that stays unbroken, this class's defaults (20 steps, 9 targets): 1 + 10 * 21
+ 1 = 212 forward and 10 * 20 = 200 backward passes (w.r.t. the input only); an image that
breaks in the untargeted run costs 1 + 21 + 1 forward and 20 backward passes (with
``early_stop``, 1 + (k + 1) + 1 forward and k + 1 backward passes if it breaks at iterate
k >= 1: its gradient at that iterate is taken with the batch's before it leaves).
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


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for this device type (torch < 2.4 had one function per
    device type)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return (torch.is_autocast_cpu_enabled() if device_type == "cpu"
                else torch.is_autocast_enabled())


def _per_image(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *[1] * (x.dim() - 1))  # (B,) -> (B, 1, ..., 1)


@dataclass(frozen=True)
class PGD:
    """PGD with ``steps`` steps of size ``rel_step * eps / steps`` in the threat model of
    ``norm`` (Madry et al.: 2.5 eps / steps, so an iterate can cross the ball and back).

    First an untargeted run maximizes the cross-entropy; then, for the images still
    unbroken, one run towards each of ``targets`` wrong classes (at most classes - 1: the
    highest clean logits, or the classes the caller gives) maximizes ``z_t - z_y``.
    Success is checked at every iterate (start and final included), and each image keeps
    its successful iterate of smallest perturbation norm; with ``early_stop`` an image
    leaves a run at its first successful iterate instead (the batch shrinks as images
    break: a distance search needs success at a size, not the smallest example). The model
    is an argument, never stored.

    Example: x_adv, success = PGD("linf", steps=10)(model, x, y, eps=8 / 255)  # x's shape, (B,)
    """

    norm: Norm | str
    steps: int = 20
    rel_step: float = 2.5
    targets: int = 9
    random_start: bool = False
    early_stop: bool = False

    def __post_init__(self):
        object.__setattr__(self, "norm", to_norm(self.norm))
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.rel_step > 0:
            raise ValueError(f"rel_step must be > 0, got {self.rel_step}")
        if self.targets < 0:
            raise ValueError(f"targets must be >= 0, got {self.targets}")

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor | float,
        targets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Attack each image ``x_i`` within size ``eps_i`` (eps: (B,), or a number); the
        targeted runs aim at ``targets`` (B, k) in order, the first ``self.targets`` of
        them (None: the highest wrong clean logits).

        Returns ``(x_adv, success)``: ``x_adv`` in [0, 1] with ``||x_adv - x|| <= eps`` (up
        to float rounding of the subtraction), the smallest successful iterate where there
        is one (``x`` for an image misclassified clean), else the last iterate of the
        untargeted run (``x`` without one); ``success = model(x_adv).argmax(1) != y``, (B,)
        bool. An image with ``eps_i = 0`` is only checked clean. The model runs in eval
        mode (each submodule's mode is restored afterwards); only the input is
        differentiated, so the parameters' ``.grad`` and ``requires_grad`` are left as they
        were.

        Cost per image and run: ``steps + 1`` forward and ``steps`` backward passes (fewer
        with ``early_stop``), plus one to confirm (a success only, with ``early_stop``) and
        one clean forward pass in full precision, which ranks the targets and tells the
        clean mistakes. It is skipped when not needed: targets given or none, no random
        start, no autocast and every ``eps_i > 0`` (the first iterate is the clean image
        then, and tells a clean mistake as exactly).
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
            best = torch.full_like(eps, torch.inf)  # (B,) norm of the smallest success
            clean = ((self.targets and targets is None) or self.random_start
                     or _autocast(x.device.type) or not bool((eps > 0).all()))
            if clean:  # in full precision: a clean mistake is not a rounding of bf16
                with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                    logits = model(x)  # clean: error gives norm 0; logits rank the targets
                best = torch.where(logits.argmax(1) != y, 0.0, best)
                wrong = logits.scatter(1, y[:, None], -torch.inf)  # (B, classes), y excluded
                if targets is None and self.targets:
                    targets = wrong.topk(min(self.targets, wrong.shape[1] - 1), dim=1).indices

            # Untargeted run on the images that are unbroken (as far as known) with eps > 0.
            idx = (best.isinf() & (eps > 0)).nonzero()[:, 0]
            if idx.numel():
                last, x_best, norm = self._run(model, threat, x[idx], y[idx], eps[idx], None,
                                               check_start=not clean)
                x_out[idx] = torch.where(_per_image(norm.isfinite(), x_best), x_best, last)
                best[idx] = norm

            # Targeted runs, each on the images still unbroken.
            for r in range(min(self.targets, 0 if targets is None else targets.shape[1])):
                idx = (best.isinf() & (eps > 0)).nonzero()[:, 0]
                if not idx.numel():
                    break
                _, x_best, norm = self._run(model, threat, x[idx], y[idx], eps[idx],
                                            targets[idx, r], check_start=not clean)
                hit = norm.isfinite()
                x_out[idx[hit]] = x_best[hit]
                best[idx[hit]] = norm[hit]

            # The returned points, checked afresh, in full precision even under a caller's
            # bf16 autocast: a success must not be an artefact of rounding. With early_stop
            # only the successes (every iterate of the others was checked and failed; an
            # iterate that succeeds in full precision only is not counted), without it
            # every point, as lipexp 0.3 did.
            success = torch.zeros_like(y, dtype=torch.bool)
            hit = (best.isfinite() | (not self.early_stop)).nonzero()[:, 0]
            if hit.numel():
                with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                    success[hit] = model(x_out[hit]).argmax(1) != y[hit]
            return x_out, success

    def _run(
        self,
        model: nn.Module,
        threat: ThreatModel,
        x: Tensor,
        y: Tensor,
        eps: Tensor,
        target: Tensor | None,
        check_start: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One PGD run: ``steps`` ascent steps of ``_objective``, each followed by the
        projection. Returns ``(last iterate, smallest successful iterate, its norm)``, the
        norm (B,) being +inf (and that iterate meaningless) where no iterate succeeded.
        ``check_start=False``: the start (the clean image, without random start) is not
        checked, its success being known in full precision already.
        With ``early_stop`` an image's run ends at its first successful iterate, which is
        then both its last and its best."""
        step_size = self.rel_step * eps / self.steps  # (B,), in units of the norm
        x_adv = threat.init(x, eps, self.random_start)
        x_last, x_best = x_adv.clone(), x_adv.clone()
        best = torch.full_like(eps, torch.inf)
        active = torch.arange(len(x), device=x.device)  # the images still running
        for i in range(self.steps + 1):
            # detach: a fresh leaf (never x itself), the only tensor differentiated
            x_adv = x_adv.detach().requires_grad_(i < self.steps)
            xa, ya = x[active], y[active]
            with torch.set_grad_enabled(i < self.steps):
                logits = model(x_adv)
            # Record success at this iterate from the same forward pass, then step.
            norm = threat.norm(x_adv.detach() - xa)  # (b,)
            better = (logits.argmax(1) != ya) & (norm < best[active])
            if i == 0 and not (check_start or self.random_start):
                better = torch.zeros_like(better)
            x_best[active] = torch.where(_per_image(better, xa), x_adv.detach(),
                                         x_best[active])
            best[active] = torch.where(better, norm, best[active])
            x_last[active] = x_adv.detach()
            if i == self.steps:
                break
            t = None if target is None else target[active]
            (g,) = torch.autograd.grad(_objective(logits, ya, t).sum(), x_adv)
            x_adv = threat.project(threat.step(x_adv.detach(), g, step_size[active]), xa,
                                   eps[active])
            if self.early_stop:  # broken images leave the batch
                keep = best[active].isinf()
                if not keep.all():
                    active, x_adv = active[keep], x_adv[keep]
                    if not active.numel():
                        break
        return x_last, x_best, best
