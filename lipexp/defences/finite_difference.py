"""The finite-difference estimate of the loss's input-gradient norm (``lip.method=fd``;
docs/method.md, "Finite-difference estimate of the gradient norm").

With ``g = grad_x l(x)`` and a unit direction ``d`` (detached: no gradient flows through
it), ``l(x + h d) - l(x) ~= h <g, d>``; for ``d = g / ||g||_2`` that is ``h ||g||_2`` and for
``d = sign(g) / sqrt(n)`` it is ``h ||g||_1 / sqrt(n)``. So

    ||g||_2 ~= (l(x + h d) - l(x)) / h                       (Lip2)
    ||g||_1 ~= sqrt(n) * (l(x + h d) - l(x)) / h             (Lip1)

with an error of ``h/2 d^T H d`` (H the loss's input Hessian): first order in the step
``h``. The estimate is differentiable w.r.t. the parameters through BOTH loss
evaluations, which replaces double backpropagation by one backward pass to the input (no
``create_graph``) and one more forward pass.

Both forward passes run with autocast off (float32 network and loss): under bf16 a loss
of order 1 keeps about 3 significant digits, and the difference ``h ||g||`` (about 0.01)
would drown in rounding.

Two ways to use it:

- ``fd_grad_norms``: an estimator of ``lipexp.defences.lipschitz.ESTIMATORS`` like the
  exact one, at whatever point the objective gets (the adversarial image under J1/J2).
  Forward passes per training step: the perturbation's (J1/J2, eval mode) + 2.
- ``adversarial_fd_objective`` (``lip.reuse_adv_gradient=true``): J1/J2 and the penalty
  share their passes. The perturbation's gradient is taken in TRAIN mode at the clean
  image, and ``x + h d`` with ``h = adv.eps`` is the adversarial image itself, so a step
  makes 2 forward passes. What changes: the attack direction uses batch statistics
  (train-mode batch norm) instead of running statistics, and the penalty estimates the
  gradient norm at the clean image instead of the adversarial one.

In both, batch norm's running statistics are updated once per step, by the pass at the
image the cross-entropy is taken at, as with the exact method: the other pass leaves
them as they were (``running_stats_kept``).

With ``adv.clip=true`` the shared step is clipped to [0, 1] where the box is hit; the
quotient then divides by the length of the step actually taken (``step_lengths``: ``eps``
where nothing is clipped) and measures the slope along the clipped direction, at most
``||g||_*``; ``adv.clip=false`` (the authors' code) keeps the estimate accurate to first
order in ``h``.
"""

import math
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipexp.defences.grad_norms import GradNorms


@contextmanager
def float32(x: Tensor):
    """Autocast off on ``x``'s device type, and on CUDA TensorFloat-32 off too (cuDNN's
    convolutions and matmuls would otherwise keep 10 mantissa bits): the enclosed passes
    run in full float32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if not x.is_cuda:
            yield
            return
        precision = torch.get_float32_matmul_precision()
        cudnn_tf32 = torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("highest")  # the user's setting is put back below
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(precision)
            torch.backends.cudnn.allow_tf32 = cudnn_tf32


@contextmanager
def running_stats_kept(model: nn.Module):
    """Batch norm's running statistics (and batch counts) as they were before the block:
    a forward pass inside it normalizes with its batch's statistics as usual (train mode)
    but does not count as one more batch of the running averages. Momentum 0 leaves the
    averages as they are inside the kernel (no later in-place write: a graph that saved
    them stays valid); the batch count is put back afterwards."""
    modules = model.modules() if isinstance(model, nn.Module) else ()  # or a function
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, count) in zip(norms, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)


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


def fd_grad_norms(model: nn.Module, x: Tensor, y: Tensor, dual_norm: int,
                  h: float = 0.01) -> GradNorms:
    """The estimator of ``lip.method=fd`` (interface of ``ESTIMATORS``): the per-example
    ``sqrt(n)^[dual_norm == 1] * (l(x + h d) - l(x)) / h`` at ``x``; two forward passes.
    The losses and logits returned are those at ``x`` (float32)."""
    losses, logits, d = clean_loss_and_direction(model, x, y, dual_norm)
    with running_stats_kept(model):  # one batch-norm update per step, at x (as exact)
        losses_h, _ = loss_at(model, x.detach() + h * d, y)
    return GradNorms(losses, logits, quotient_to_norm(losses, losses_h, h, dual_norm,
                                                      x[0].numel()))


def adversarial_fd_objective(model: nn.Module, x: Tensor, y: Tensor, eps: float, clip: bool,
                             **penalty: object) -> tuple[Tensor, dict[str, Tensor]]:
    """J1-Lip1 / J2-Lip2 with the fd penalty sharing the adversarial step's passes
    (``lip.reuse_adv_gradient=true``; ``x`` is the CLEAN batch, the model in train mode).

    ``d`` from the train-mode gradient at ``x`` (J2: ``g / ||g||_2`` with dual_norm 2; J1:
    ``sign(g) / sqrt(n)`` with dual_norm 1), ``x_adv = x + eps d`` (clipped to [0, 1] if
    ``clip``), then ``J = mean_i l(x_adv_i) + w h(max_i N_i)`` with
    ``N_i = sqrt(n)^[dual_norm == 1] (l(x_adv_i) - l(x_i)) / s_i``, ``s_i`` the step taken
    (``step_lengths``; ``eps`` unclipped, ``N_i = 0`` for no step) and ``w h(.)`` the
    penalty of ``penalized_cross_entropy`` (its keyword settings in ``penalty``).
    Two forward passes.
    """
    from lipexp.defences.lipschitz import penalized  # lipschitz.py imports this module

    dual_norm = int(penalty["dual_norm"])
    with running_stats_kept(model):  # batch norm counts the adversarial batch only
        losses, _, d = clean_loss_and_direction(model, x, y, dual_norm)
    x_adv = x.detach() + eps * d
    x_adv = (x_adv.clamp(0.0, 1.0) if clip else x_adv).detach()
    losses_adv, logits_adv = loss_at(model, x_adv, y)
    steps = step_lengths(x_adv - x.detach(), dual_norm)  # (B,): eps unless clipped
    norms = quotient_to_norm(losses, losses_adv, steps.clamp_min(torch.finfo(steps.dtype).tiny),
                             dual_norm, x[0].numel())
    norms = torch.where(steps > 0, norms, torch.zeros_like(norms))  # no step, no slope
    return penalized(GradNorms(losses_adv, logits_adv, norms), y, n=x[0].numel(), **penalty)


def share_adversarial_passes(perturb: Callable, objective: Callable) -> tuple[Callable, Callable]:
    """``(perturb, objective)`` of a run with ``lip.reuse_adv_gradient=true`` (partials as Hydra
    builds them): the clean batch passes through and ``adversarial_fd_objective`` makes the
    J1/J2 step and the penalty. Refuses what it cannot share: no attack step (J0), an
    attack whose direction is not the penalty's (J2 pairs with Lip2, J1 with Lip1), or
    ``lip.h`` different from ``adv.eps`` (the adversarial image must be ``x + h d``)."""
    from lipexp.defences.adversarial import l2_gradient_step, no_perturbation, signed_gradient_step

    settings = dict(objective.keywords)
    settings.pop("method", None)
    h = settings.pop("h", 0.01)
    settings.pop("reuse_adv_gradient", None)
    pairs = {l2_gradient_step: (2, "adv=j2 with lip=lip2"),
             signed_gradient_step: (1, "adv=j1 with lip=lip1")}
    func = getattr(perturb, "func", perturb)
    if func not in pairs or pairs[func][0] != settings["dual_norm"]:
        raise ValueError("lip.reuse_adv_gradient=true shares the attack's direction with the "
                         "penalty's: use adv=j2 with lip.dual_norm=2 or adv=j1 with "
                         f"lip.dual_norm=1 (got {getattr(func, '__name__', func)} and "
                         f"dual_norm={settings['dual_norm']})")
    eps, clip = perturb.keywords["eps"], perturb.keywords.get("clip", True)
    if not math.isclose(h, eps, rel_tol=1e-12):
        raise ValueError(f"lip.reuse_adv_gradient=true: the adversarial image is x + h d, so "
                         f"lip.h must equal adv.eps (got lip.h={h}, adv.eps={eps}); set "
                         f"lip.h={eps}")
    fused = partial(adversarial_fd_objective, eps=eps, clip=clip, **settings)
    return no_perturbation, fused
