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

- ``fd_grad_norms``: an estimator of ``lipexp.defences.lipschitz.ESTIMATORS`` like the
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

import copy
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
    """Autocast off on ``x``'s device type, and on CUDA TensorFloat-32 off too: the enclosed
    passes run in full float32."""
    with torch.autocast(device_type=x.device.type, enabled=False), tf32_off(x.device):
        yield


@contextmanager
def tf32_off(device: torch.device):
    """On CUDA, TensorFloat-32 off inside the block (cuDNN's convolutions and matmuls would
    otherwise keep 10 mantissa bits), the user's settings put back after; on other devices
    nothing. The fd step's backward pass runs inside it too (RobustClassifier.backward):
    the penalty's parameter gradient is a difference of two nearly equal gradients."""
    if torch.device(device).type != "cuda":
        yield
        return
    # the two CUDA switches only (torch.set_float32_matmul_precision would also rewrite
    # other backends' settings on the way back)
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
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


def _uses_batch_statistics(m: nn.Module) -> bool:
    """Whether ``m`` is a batch norm layer that normalizes with its batch's statistics (train
    mode, or no running statistics to use)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (
        m.training or m.running_mean is None)


class BatchStatistics:
    """Batch normalization with one batch's statistics held fixed (the fd estimate's
    per-example loss; docs/method.md, "Finite-difference estimate of the gradient norm").

    In train mode a batch norm layer normalizes each example with the mean and variance of
    its batch, so an example's loss also depends on the other examples. The estimate takes
    the per-example function the batch defines,
    ``l_i(x) = CE(f(x; mu_B, var_B), y_i)`` with every layer's ``mu_B, var_B`` (over batch
    and spatial positions, biased variance, as batch norm) those of the batch at the point.
    ``record()``: during the pass at the point each layer runs batch norm's own kernel
    (``torch.native_batch_norm``: the same output and running-statistics update as the
    layer's forward) and keeps the statistics it computed, made differentiable w.r.t. the
    layer's input by ``_Statistics`` (the penalty's gradient flows through them as through
    batch norm). Inside ``fixed()`` the layers normalize with them,
    ``(z - mu_B) / sqrt(var_B + eps) * weight + bias``: each example is a function of its
    own input only, and the running statistics are left alone. Layers that normalize with
    running statistics (eval mode) are per-example already and are not touched.

    Written by hand: PyTorch's batch norm module returns no statistics and takes no
    differentiable ones. A plain ``model`` function (not an nn.Module) has no layers to fix.
    """

    def __init__(self, model: nn.Module) -> None:
        modules = model.modules() if isinstance(model, nn.Module) else ()
        self.layers = [m for m in modules if _uses_batch_statistics(m)]
        custom = [type(m).__name__ for m in self.layers
                  if type(m).forward not in (nn.modules.batchnorm._BatchNorm.forward,
                                             nn.SyncBatchNorm.forward)]
        if custom:  # its own forward would be replaced by plain batch norm's
            raise ValueError(f"lip.method=fd holds batch norm's statistics fixed by running "
                             f"the layers itself; {', '.join(sorted(set(custom)))} has a "
                             "forward of its own (use lip.method=exact)")
        self.stats: dict[nn.Module, tuple[Tensor, Tensor]] = {}  # layer -> (mean, 1/std)

    @contextmanager
    def _forwards(self, forward: Callable, layers: list[nn.Module]):
        """Each layer's ``forward`` replaced by ``forward(layer, z)`` inside the block (an
        instance attribute wins over the class's), whatever was there put back after."""
        saved = [layer.__dict__.get("forward") for layer in layers]
        for layer in layers:
            layer.forward = partial(forward, layer)
        try:
            yield self
        finally:
            for layer, previous in zip(layers, saved):
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous

    def record(self):
        return self._forwards(self._record, self.layers)

    def _record(self, layer: nn.Module, z: Tensor) -> Tensor:
        """``layer(z)`` (train mode: batch statistics, one running-statistics update, as
        ``_BatchNorm.forward``), keeping the statistics."""
        if isinstance(layer, nn.SyncBatchNorm) and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError("lip.method=fd holds each rank's batch statistics fixed; it cannot "
                             "be combined with SyncBatchNorm (trainer.sync_batchnorm=true)")
        if layer in self.stats:  # a layer called twice in a pass has two sets of statistics
            raise ValueError(f"lip.method=fd: the batch norm layer {layer} is called more than "
                             "once in a forward pass; its statistics cannot be held fixed")
        layer._check_input_dim(z)
        # as the layer's own forward, which normalizes with batch statistics here: one value
        # per channel is refused
        F._verify_batch_size(z.size())
        factor = 0.0 if layer.momentum is None else layer.momentum
        if layer.training and layer.track_running_stats and layer.num_batches_tracked is not None:
            layer.num_batches_tracked.add_(1)
            if layer.momentum is None:  # cumulative moving average
                factor = 1.0 / float(layer.num_batches_tracked)
        track = not layer.training or layer.track_running_stats
        out, mean, invstd = torch.native_batch_norm(
            z, layer.weight, layer.bias, layer.running_mean if track else None,
            layer.running_var if track else None, True, factor, layer.eps)
        self.stats[layer] = _Statistics.apply(z, mean, invstd)
        return out

    def fixed(self, differentiable: bool = True):
        """Later passes normalize with the recorded statistics; ``differentiable=False``
        treats them as constants (batch norm's inference kernel: each example's gradient is
        then its own, without the statistics' path to the batch at the point)."""
        # the layers the recorded pass called (one it never calls needs no statistics)
        return self._forwards(partial(self._normalize, differentiable=differentiable),
                              list(self.stats))

    def _normalize(self, layer: nn.Module, z: Tensor, differentiable: bool) -> Tensor:
        """Batch norm of ``z`` (B, C, ...) with the recorded (C,) statistics: batch norm's
        inference kernel (statistics as constants), or the formula written out when the
        statistics' graph is needed."""
        mean, invstd = self.stats[layer]
        if not (differentiable and torch.is_grad_enabled()):  # var from 1/std: up to rounding
            return F.batch_norm(z, mean.detach(), invstd.detach().pow(-2) - layer.eps,
                                layer.weight, layer.bias, False, 0.0, layer.eps)
        shape = (1, -1, *[1] * (z.dim() - 2))  # (C,) -> (1, C, 1, ...)
        out = (z - mean.view(shape)) * invstd.view(shape)
        if layer.affine:
            out = out * layer.weight.view(shape) + layer.bias.view(shape)
        return out


def with_batch_statistics(model: nn.Module, x: Tensor) -> nn.Module:
    """A copy of ``model`` whose batch norm layers that normalize with batch statistics (as
    ``BatchStatistics`` chooses them) normalize with those of the batch ``x`` instead, as
    running statistics in eval mode (a cumulative average over that one batch, the variance
    made biased as batch norm uses it); the other modules as in ``model``. It is
    ``BatchStatistics``' per-example loss by PyTorch's own layers, the reference that tests
    and benchmarks/fd_accuracy.py check it against."""
    ref = copy.deepcopy(model)
    layers = [m for m in ref.modules() if _uses_batch_statistics(m)]
    counts = {}  # layer -> values per channel of its input
    for m in layers:
        if m.running_mean is None:  # no running statistics: give it some to hold the batch's
            m.track_running_stats = True
            m.register_buffer("running_mean", torch.zeros(m.num_features))
            m.register_buffer("running_var", torch.ones(m.num_features))
            m.register_buffer("num_batches_tracked", torch.tensor(0))
            m.to(x.device, x.dtype)
        m.reset_running_stats()
        m.momentum = None
        m.train()
    hooks = [m.register_forward_pre_hook(
        lambda m, a: counts.__setitem__(m, a[0].numel() / a[0].shape[1])) for m in layers]
    with torch.no_grad():
        ref(x)
    for hook in hooks:
        hook.remove()
    for m, count in counts.items():
        m.running_var *= (count - 1) / count
        m.eval()
    return ref


class _Statistics(torch.autograd.Function):
    """``(mean, invstd)`` of ``z`` (B, C, ...) per channel, as batch norm's kernel computed
    them (passed in: no second reduction in the forward pass), differentiable w.r.t. ``z``:
    with ``M`` values per channel, ``d mean / dz = 1 / M`` and, from
    ``invstd = (var + eps)^(-1/2)`` and ``d var / dz = 2 (z - mean) / M``,
    ``d invstd / dz = -invstd^3 (z - mean) / M``."""

    @staticmethod
    def forward(ctx, z: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(z, mean, invstd)
        return mean.clone(), invstd.clone()

    @staticmethod
    def backward(ctx, g_mean: Tensor, g_invstd: Tensor) -> tuple[Tensor, None, None]:
        z, mean, invstd = ctx.saved_tensors
        shape = (1, -1, *[1] * (z.dim() - 2))  # (C,) -> (1, C, 1, ...)
        count = z.numel() // z.shape[1]
        c = g_invstd * invstd.pow(3)  # (C,)
        # (g_mean - c (z - mean)) / M as one pass over z: (g_mean + c mean) / M + z (-c / M)
        return torch.addcmul(((g_mean + c * mean) / count).view(shape), z,
                             (-c / count).view(shape)), None, None


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
