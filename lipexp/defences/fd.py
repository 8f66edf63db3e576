"""The finite-difference estimate of the loss's input-gradient norm (``lip.method=fd``;
docs/method.md, "Finite-difference estimate of the gradient norm").

With ``g = grad_x l(x)`` and a unit direction ``d`` (detached: no gradient flows through
it), ``l(x + h d) - l(x) ~= h <g, d>``; for ``d = g / ||g||_2`` that is ``h ||g||_2`` and for
``d = sign(g) / sqrt(n)`` it is ``h ||g||_1 / sqrt(n)``. So

    ||g||_2 ~= (l(x + h d) - l(x)) / h                       (Lip2)
    ||g||_1 ~= sqrt(n) * (l(x + h d) - l(x)) / h             (Lip1)

with an error of ``h/2 d^T H d`` (H the loss's input Hessian): first order in the step
``h``. The estimate is differentiable w.r.t. the parameters through BOTH loss
evaluations (not through ``d``), which replaces double backpropagation.

All the estimate's passes run with autocast off (float32 network and loss): under bf16 a loss
of order 1 keeps about 3 significant digits, and the difference ``h ||g||`` (about 0.01)
would drown in rounding.

Three ways to use it (``lipexp.defences.compose`` picks one from the run's settings and holds
the two objectives that share the attack's passes):

- ``fd_grad_norms``: an estimator of ``lipexp.defences.penalty.ESTIMATORS`` like the
  exact one, at whatever point the objective gets; ``d`` from the gradient there (one
  backward pass to the input) unless a direction is passed. The batch statistics of the
  point are held fixed at ``x + h d`` (``BatchStatistics``): each image's loss is then its
  own, so only the arg-max image, the one the penalty's max uses, needs a graph there.
- ``attack_fd_objective`` (J1/J2, ``lip.direction=attack``, the default): ``d`` from the
  perturbation's own gradient (eval mode, clean image); per step 3 forward passes over the
  batch (the attack's; ``l(x_adv)``; ``l(x_adv + h d)`` without a graph) and one image,
  and no backward pass to the input besides the attack's.
- ``adversarial_fd_objective`` (``lip.reuse_adv_gradient=true``): J1/J2 and the penalty
  share their passes. The perturbation's gradient is taken in TRAIN mode at the clean
  image, and ``x + h d`` with ``h = adv.eps`` is the adversarial image itself, so a step
  makes 2 forward passes. What changes: the attack direction uses batch statistics
  (train-mode batch norm) instead of running statistics, and the penalty estimates the
  gradient norm at the clean image instead of the adversarial one; each pass normalizes
  with its own batch's statistics.

In all, batch norm's running statistics are updated once per step, by the pass at the
image the cross-entropy is taken at, as with the exact method.

With ``adv.clip=true`` the shared step is clipped to [0, 1] where the box is hit; the
quotient then divides by the length of the step actually taken (``step_lengths``: ``eps``
where nothing is clipped) and measures the slope along the clipped direction, at most
``||g||_*``; ``adv.clip=false`` (the authors' code) keeps the estimate accurate to first
order in ``h``.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipexp.defences.batch_stats import BatchStatistics
from lipexp.defences.grad_norms import GradNorms
from lipexp.precision import float32


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 if it is a half type (float64 kept)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def unit_direction(g: Tensor, dual_norm: int) -> Tensor:
    """``d`` with ``<g, d> = ||g||_2`` (dual_norm 2: ``g / ||g||_2``) or
    ``||g||_1 / sqrt(n)`` (dual_norm 1: ``sign(g) / sqrt(n)``), per example, detached; both
    have l2 norm 1 (0 where ``g = 0``)."""
    g = g.detach()
    if dual_norm == 1:
        return g.sign() / math.sqrt(g[0].numel())
    if dual_norm == 2:
        norm = g.flatten(1).norm(dim=1).view(-1, *[1] * (g.dim() - 1))  # (B,) -> (B, 1, ...)
        return g / norm.clamp_min(torch.finfo(g.dtype).tiny)
    raise ValueError(f"lip.dual_norm must be 1 or 2 for lip.method=fd, got {dual_norm}")


def step_lengths(step: Tensor, dual_norm: int) -> Tensor:
    """(B,) lengths of the steps ``step`` (B, ...) actually taken, in the units where the
    unclipped step ``eps d`` has length ``eps``: ``||s||_2`` for dual_norm 2 and
    ``sqrt(n) ||s||_inf`` for dual_norm 1 (``d = sign(g) / sqrt(n)``). Dividing the loss
    difference by it keeps the quotient at most ``||g||_2``, resp. ``||g||_1`` (Hoelder:
    ``<g, s> <= ||g||_1 ||s||_inf``) when clipping shortens the step."""
    flat = step.flatten(1)  # (B, n)
    if dual_norm == 1:
        return flat.abs().amax(dim=1) * math.sqrt(flat.shape[1])
    return flat.norm(dim=1)


def quotient_to_norm(losses: Tensor, losses_h: Tensor, h: float | Tensor, dual_norm: int,
                     n: int) -> Tensor:
    """``(l(x + h d) - l(x)) / h`` (``h`` a number, or (B,) per-example steps), times
    ``sqrt(n)`` for dual_norm 1, so that the result is in the units of ``||g||_dual_norm``
    (as the exact estimator's, the logs and the hinge)."""
    q = (losses_h - losses) / h
    return q * math.sqrt(n) if dual_norm == 1 else q


def clean_loss_and_direction(model: nn.Module, x: Tensor, y: Tensor,
                             dual_norm: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(l(x), f(x), d)`` in float32 and the model's current mode; ``l(x)`` (B,) keeps its
    graph for the parameters' gradient, ``d`` is detached. One forward pass, one backward
    pass to the input only."""
    x0 = x.detach().requires_grad_(True)
    with float32(x), torch.enable_grad():
        logits = model(x0)
        losses = F.cross_entropy(_wide(logits), y, reduction="none")  # (B,)
        # Sum: each x_i gets its own gradient. retain_graph: the parameters' gradient later.
        (g,) = torch.autograd.grad(losses.sum(), x0, retain_graph=True)
    return losses, logits, unit_direction(g, dual_norm)


def loss_at(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(l(x), f(x))`` in float32, differentiable w.r.t. the parameters."""
    with float32(x):
        logits = model(x.detach())
        return F.cross_entropy(_wide(logits), y, reduction="none"), logits


def fd_grad_norms(model: nn.Module, x: Tensor, y: Tensor, dual_norm: int, h: float = 0.01,
                  direction: Tensor | None = None) -> GradNorms:
    """The estimator of ``lip.method=fd`` (interface of ``ESTIMATORS``): per example
    ``N_i = sqrt(n)^[dual_norm == 1] * (l_i(x_i + h d_i) - l_i(x_i)) / h``, ``l_i`` with the
    batch's statistics held fixed (``BatchStatistics``), all in float32.

    ``d``: ``direction`` if given (detached; J1/J2 pass their own gradient's), otherwise
    ``unit_direction`` of ``grad l_i(x_i)`` with the statistics held fixed: one more forward
    pass and a backward pass to the input. (Not the gradient of the batch's summed loss
    through train-mode batch norm: its cross-terms between images dominate where batch
    norm sits on the logits, as in the tanh head, and turn that direction away from the
    image's own gradient: docs/method.md.)

    Only the largest estimate enters the penalty (``max_i N_i``), so only its image needs a
    graph at ``x + h d``: the pass there runs without one over the batch, and the arg-max
    image runs again with one. Cost: one forward pass with a graph (at ``x``; the
    cross-entropy's too), one without, one image; the backward pass through ``x + h d`` is
    one image's instead of the batch's. ``norms`` is differentiable w.r.t. the parameters at
    its arg-max only (the others are detached: their gradient would be zero in the max).
    The losses and logits returned are those at ``x`` (float32). Under ``torch.compile`` the
    passes run on the uncompiled network (swapping the layers' forward would make the
    compiled one recompile).
    """
    net = getattr(model, "_orig_mod", model)  # torch.compile's wrapper -> the network itself
    stats = BatchStatistics(net)
    n = x[0].numel()
    with float32(x), torch.enable_grad():
        with stats.record():  # batch norm's one running-statistics update of the step
            logits = net(x.detach())
        losses = F.cross_entropy(_wide(logits), y, reduction="none")  # (B,)
        if direction is None:  # the gradient of each l_i at x_i, statistics held fixed
            x0 = x.detach().requires_grad_(True)
            with stats.fixed(differentiable=False):
                losses_0 = F.cross_entropy(_wide(net(x0)), y, reduction="none")
            (g,) = torch.autograd.grad(losses_0.sum(), x0)  # sum: each x_i its own gradient
            direction = unit_direction(g, dual_norm)
        x_h = (x.detach() + h * direction.detach()).to(x.dtype)  # (B, ...)
        with stats.fixed():
            with torch.no_grad():
                losses_h = F.cross_entropy(_wide(net(x_h)), y, reduction="none")  # (B,)
            norms = quotient_to_norm(losses.detach(), losses_h, h, dual_norm, n)  # (B,)
            k = norms.argmax().view(1)  # (1,): no host sync
            loss_k = F.cross_entropy(_wide(net(x_h.index_select(0, k))), y.index_select(0, k),
                                     reduction="none")  # (1,), with a graph
    norm_k = quotient_to_norm(losses.index_select(0, k), loss_k, h, dual_norm, n)  # (1,)
    # The batch pass's values (so the max, here and across ranks, is taken over one set of
    # numbers), with the image pass's gradient at the arg-max and at entries tied with it
    # (max splits its gradient among ties: each then carries one image's).
    at_k = (norms == norms.index_select(0, k)).to(norms.dtype)  # (B,)
    return GradNorms(losses, logits, norms + at_k * (norm_k - norm_k.detach()))
