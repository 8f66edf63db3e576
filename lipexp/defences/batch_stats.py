"""Batch normalization with one batch's statistics held fixed: the per-example loss that the
finite-difference penalty estimates (docs/method.md, "Finite-difference estimate of the
gradient norm") and the exact penalty differentiates with ``lip.batch_stats=fixed``
("Which gradient the penalty sees: batch statistics live or fixed"), its reference by
PyTorch's own layers, and running statistics left alone.
"""

import copy
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def __init__(self, model: nn.Module, setting: str = "lip.method=fd",
                 instead: str = "lip.method=exact") -> None:
        """``setting``: the setting that holds the statistics fixed, named in refusals
        (``instead``: the one to use then); lip.method=fd's, or the exact penalty's
        lip.batch_stats=fixed (lipexp.defences.penalty.exact_grad_norms)."""
        modules = model.modules() if isinstance(model, nn.Module) else ()
        self.layers = [m for m in modules if _uses_batch_statistics(m)]
        self.setting = setting
        custom = [type(m).__name__ for m in self.layers
                  if type(m).forward not in (nn.modules.batchnorm._BatchNorm.forward,
                                             nn.SyncBatchNorm.forward)]
        if custom:  # its own forward would be replaced by plain batch norm's
            raise ValueError(f"{setting} holds batch norm's statistics fixed by running "
                             f"the layers itself; {', '.join(sorted(set(custom)))} has a "
                             f"forward of its own (use {instead})")
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
            raise ValueError(f"{self.setting} holds each rank's batch statistics fixed; it "
                             "cannot be combined with SyncBatchNorm (trainer.sync_batchnorm=true)")
        if layer in self.stats:  # a layer called twice in a pass has two sets of statistics
            raise ValueError(f"{self.setting}: the batch norm layer {layer} is called more "
                             "than once in a forward pass; its statistics cannot be held fixed")
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
