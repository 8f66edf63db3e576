"""Training objectives: cross-entropy, and cross-entropy plus the Lipschitz penalty of the
loss (the study's Lip1 / Lip2; docs/method.md, "Training objective").

Each objective is a plain function ``(model, x, y) -> (loss, logs)`` once Hydra has bound
its settings (``_partial_``); ``x`` is the (possibly perturbed) training batch and the model
is in train mode, as in the authors' code (batch normalization uses batch statistics).

The penalty needs each example's input-gradient norm ``||grad_x l(x_i)||_*``. How it is
obtained is an estimator, ``(model, x, y, dual_norm, h) -> GradNorms`` (``lip.method``):
the estimator runs the forward pass itself, so that the finite-difference estimate
(``lip.method=fd``, lipexp.defences.fd), which evaluates the loss at a second
point ``h`` away, fits the same interface as double backpropagation (``exact``).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipexp.config.schema import BatchStats, Direction, Method, Scaling
from lipexp.defences.batch_stats import BatchStatistics
from lipexp.defences.fd import fd_grad_norms
from lipexp.defences.grad_norms import GradNormEstimator, GradNorms
from lipexp.distributed import gather_batch

__all__ = ["ESTIMATORS", "GradNormEstimator", "GradNorms", "cross_entropy",
           "exact_grad_norms", "needs_double_backward", "penalized", "penalized_cross_entropy"]


def exact_grad_norms(model: nn.Module, x: Tensor, y: Tensor, dual_norm: int,
                     h: float | None = None,
                     batch_stats: BatchStats | str = BatchStats.live) -> GradNorms:
    """``||grad_x l(x_i)||_dual_norm`` for each i by double backpropagation (``h`` unused).

    ``batch_stats`` (docs/method.md, "Which gradient the penalty sees: batch statistics
    live or fixed") says what happens where batch norm normalizes with the batch's
    statistics (train mode):

    - ``live`` (the authors' code): ``g_i = d/dx_i sum_j CE(f(x_j; mu(x), var(x)), y_j)``,
      the gradient of the SUM of the losses of one train-mode pass. Each example gets its
      own gradient plus the path through the batch's mean and variance ``mu(x), var(x)``,
      which couples the examples (in the tanh head, which normalizes the logits, that
      path cancels most of the image's own gradient).
    - ``fixed``: ``g_i = grad_x CE(f(x; mu_B, var_B), y_i) at x = x_i``, every layer's
      ``mu_B, var_B`` (biased variance, as batch norm) those of the batch ``x`` held as
      constants w.r.t. the input (``BatchStatistics``), the per-example loss that
      ``lip.method=fd`` estimates. They stay functions of the parameters, so the penalty
      trains through them as through batch norm. Passes: one train-mode forward pass for
      the cross-entropy and the logits (batch norm's one running-statistics update of the
      step), one more with the statistics fixed for the gradient. A network without
      layers that use batch statistics: the same as ``live`` (one pass). The two passes
      would draw different dropout masks (none of lipexp's models has dropout; so would
      fd's passes at ``x`` and ``x + h d``).

    ``create_graph`` keeps ``g`` differentiable, so the penalty's gradient w.r.t. the
    parameters is exact.
    """
    net = getattr(model, "_orig_mod", model)  # torch.compile's wrapper -> the network itself
    stats = BatchStatistics(net, setting="lip.batch_stats=fixed",
                            instead="lip.batch_stats=live") \
        if BatchStats(batch_stats) is BatchStats.fixed else None
    if stats is None or not stats.layers:
        x = x.detach().requires_grad_(True)
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")  # (B,)
        (g,) = torch.autograd.grad(losses.sum(), x, create_graph=True)
    else:
        with stats.record():  # the step's one train-mode pass, statistics kept
            logits = net(x.detach())
        losses = F.cross_entropy(logits, y, reduction="none")  # (B,)
        x0 = x.detach().requires_grad_(True)
        with stats.fixed():  # each example a function of its own input: sum -> own gradients
            losses_0 = F.cross_entropy(net(x0), y, reduction="none")
        (g,) = torch.autograd.grad(losses_0.sum(), x0, create_graph=True)
    norms = torch.linalg.vector_norm(g.flatten(1), ord=dual_norm, dim=1)  # (B, n) -> (B,)
    return GradNorms(losses, logits, norms)


# lip.method -> estimator (lipexp.defences.fd for fd).
ESTIMATORS: dict[Method, GradNormEstimator] = {Method.exact: exact_grad_norms,
                                               Method.fd: fd_grad_norms}


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).float().mean()


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``J = mean_i CE(f(x_i), y_i)``: no penalty."""
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    return ce, {"loss": ce.detach(), "ce": ce.detach(), "acc": _accuracy(logits, y)}


def penalized_cross_entropy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    dual_norm: int,
    lam: float,
    lam_over_sqrt_n: bool = False,
    scaling: Scaling | str = Scaling.batch_mean,
    target: float | None = None,
    squared: bool = False,
    method: Method | str = Method.exact,
    h: float = 0.01,
    direction: Direction | str = Direction.attack,
    reuse_adv_gradient: bool = False,
    batch_stats: BatchStats | str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``J = mean_i l(x_i) + w * h(L)``: the study's worst-case (WCAT) Lipschitz penalty.

    - ``l(x) = CE(f(x), y)``; ``L = max_i ||grad_x l(x_i)||_dual_norm`` over the WHOLE
      batch, across all data-parallel ranks (per-example units, as logged in
      ``grad_norm_max``); the norms come from the estimator of ``method`` (``h``: the
      finite-difference step of ``fd``, l2 size in pixels) and, for ``exact``, the
      ``batch_stats`` given (``live`` / ``fixed``: ``exact_grad_norms``; None: the method's
      own, exact live and fd fixed; fd with ``live`` is refused).
    - ``h(L) = L``; with a ``target`` L0 the hinge ``max(0, L - L0)``; squared if ``squared``.
    - ``w = lam``, or ``lam / sqrt(n)`` with ``lam_over_sqrt_n`` (Lip1; n = C*H*W); divided by
      the global batch size B when ``scaling=batch_mean`` (as the authors' code, whose
      penalty is the gradient of the batch-MEAN loss: ``h(L) / B`` for the plain max).

    Logs the raw per-example norms (``grad_norm_max``/``grad_norm_mean``, unscaled, global).
    fd's ``direction=attack`` (d from the J1/J2 step's gradient) and ``reuse_adv_gradient``
    (fd sharing J1/J2's passes) need the clean batch: ``lipexp.defences.compose`` (called by
    ``lipexp.runs.build.build_module``) builds them. Called on a batch alone, this function
    takes d from the gradient at ``x`` (as ``direction=point``; J0 always does) and refuses
    ``reuse_adv_gradient``.
    """
    if reuse_adv_gradient:
        raise ValueError("lip.reuse_adv_gradient=true needs the clean batch: build the "
                         "objective with lipexp.runs.build.build_module (adversarial_fd_objective)")
    Direction(direction)  # a bad value fails here, not silently
    method, batch_stats = Method(method), BatchStats.of(method, batch_stats)
    options = {"batch_stats": batch_stats} if method is Method.exact else {}  # fd: fixed
    est = ESTIMATORS[method](model, x, y, dual_norm, h, **options)
    return penalized(est, y, n=x[0].numel(), dual_norm=dual_norm, lam=lam,
                     lam_over_sqrt_n=lam_over_sqrt_n, scaling=scaling, target=target,
                     squared=squared)


def penalized(
    est: GradNorms,
    y: Tensor,
    n: int,
    dual_norm: int,
    lam: float,
    lam_over_sqrt_n: bool = False,
    scaling: Scaling | str = Scaling.batch_mean,
    target: float | None = None,
    squared: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(J, logs)`` of ``penalized_cross_entropy`` from an estimator's output; ``n`` is the
    input dimension (C*H*W) of Lip1's weight ``lam / sqrt(n)``."""
    norms = gather_batch(est.norms)  # (B_global,)
    largest = norms.max()
    excess = largest if target is None else (largest - target).clamp_min(0.0)
    weight = lam / math.sqrt(n) if lam_over_sqrt_n else lam
    if Scaling(scaling) is Scaling.batch_mean:
        weight = weight / norms.numel()
    penalty = weight * (excess.square() if squared else excess)
    ce = est.losses.mean()
    loss = ce + penalty
    logs = {
        "loss": loss.detach(),
        "ce": ce.detach(),
        "penalty": penalty.detach(),
        "grad_norm_max": largest.detach(),
        "grad_norm_mean": norms.mean().detach(),
        "acc": _accuracy(est.logits, y),
    }
    return loss, logs


def needs_double_backward(objective: Callable) -> bool:
    """Whether the objective (a partial of the functions above) backpropagates through a
    gradient, which PyTorch's SyncBatchNorm does not support."""
    keywords = getattr(objective, "keywords", {})
    return (getattr(objective, "func", None) is penalized_cross_entropy
            and Method(keywords.get("method", Method.exact)) is Method.exact)
