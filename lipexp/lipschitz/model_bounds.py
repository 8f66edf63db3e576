"""Lipschitz constants of a network in l2 (docs/method.md, "Lipschitz estimates").

Two numbers bracket the Lipschitz constant ``L`` of the logits ``f`` in l2 (the smallest
``L`` with ``||f(x) - f(x')||_2 <= L ||x - x'||_2`` for all images):

- ``upper_bound(net, input_shape)``: data-independent, the product of the layers' operator
  norms (a residual block contributes ``||shortcut|| + ||branch||``). Each linear layer's
  norm is its largest singular value AS A LINEAR MAP AT ITS ACTUAL INPUT SIZE (a
  convolution's padding and stride included, not the kernel's matrix norm), found by power
  iteration on ``A^T A``; batch normalization in eval mode is the diagonal scaling
  ``|gamma| / sqrt(running_var + eps)``, whose norm is its largest entry; ReLU, tanh and
  the tanh head's squashing are 1-Lipschitz; pooling layers are linear maps (average) or
  have a counted bound (max). Since ``f`` is a composition, ``L <= prod_k L_k``.
- ``jacobian_spectral_norms(net, x)``: empirical, per image the largest singular value of
  the input Jacobian of the logits, ``||J(x_i)||_2``. For a unit ``v``, ``||J v|| <=
  ||J||_2 <= L``, so every power-iteration iterate is already a valid lower bound; the
  iterations only tighten it.

Power iteration converges to the largest singular value from below; ``upper_bound`` runs
it to a relative change below ``tol`` per layer (the product's slack, orders of magnitude
for deep networks, dwarfs that residual).

This is written here rather than taken from a library: torch.nn.utils.spectral_norm
normalizes a weight's matrix (the kernel's matrix norm, not the convolution's), and no
dependency of lipexp bounds a whole network.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import singledispatch

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.resnet import ResNet as TorchvisionResNet

from lipexp.model_state import eval_mode, frozen_parameters
from lipexp.models.allcnn import AllCNN
from lipexp.models.heads import TanhHead
from lipexp.models.resnet import BranchBlock, ResNet
from lipexp.models.small_cnn import SmallCNN

ITERATIONS = 500  # at most, per layer
TOL = 1e-6  # relative change of the singular value estimate that ends the iteration


def operator_norm(linear: Callable[[Tensor], Tensor], input_shape: tuple[int, ...],
                  iterations: int = ITERATIONS, tol: float = TOL, seed: int = 0,
                  device: torch.device | str = "cpu") -> float:
    """Largest singular value of the LINEAR map ``linear`` on inputs of ``input_shape``
    (one example, no batch dimension), by power iteration on ``A^T A``.

    ``A^T u`` is the vector-Jacobian product of ``A`` (autograd), so any linear PyTorch
    function works (convolution, pooling, a grouped convolution followed by a mean).
    Returns ``||A v||`` for the final unit ``v``, a lower estimate that converges to
    ``sigma_max`` (``<= sigma_max`` at every step).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn((1, *input_shape), generator=g, dtype=torch.float64).to(device)
    v = v / v.norm()
    sigma = 0.0
    with torch.enable_grad():
        for _ in range(iterations):
            v = v.detach().requires_grad_(True)
            u = linear(v)
            new = u.norm().item()
            (w,) = torch.autograd.grad(u, v, grad_outputs=u)  # A^T A v
            norm = w.norm()
            if norm == 0:  # A v = 0: A is 0 on this direction; the map may be 0
                return new
            v = w / norm
            if abs(new - sigma) <= tol * max(new, 1e-30):
                return new
            sigma = new
    return sigma


# ---------------------------------------------------------------- the upper bound, by layer


@singledispatch
def layer_bound(module: nn.Module, shapes: dict[nn.Module, tuple[int, ...]]) -> float:
    """The l2 Lipschitz bound of ``module`` at the input shapes recorded in ``shapes``
    (module -> its input's shape without the batch dimension). Unknown modules raise:
    a bound that silently skipped a layer would be wrong."""
    raise TypeError(f"no Lipschitz bound for {type(module).__name__}: add a layer_bound "
                    "rule in lipexp/lipschitz/model_bounds.py")


def _product(modules, shapes) -> float:
    return math.prod(layer_bound(m, shapes) for m in modules)


@layer_bound.register
def _(module: nn.Sequential, shapes) -> float:
    return _product(module, shapes)


@layer_bound.register(nn.ReLU)
@layer_bound.register(nn.Tanh)
@layer_bound.register(nn.Identity)
@layer_bound.register(nn.Flatten)
@layer_bound.register(nn.Dropout)
def _(module: nn.Module, shapes) -> float:
    return 1.0  # 1-Lipschitz (Dropout: the identity in eval mode)


def _linear_map_norm(fn: Callable[[Tensor], Tensor], module: nn.Module, shapes) -> float:
    param = next(module.parameters(), None)
    device = param.device if param is not None else "cpu"
    return operator_norm(fn, shapes[module], device=device)


@layer_bound.register
def _(module: nn.Conv2d, shapes) -> float:
    weight = module.weight.double()

    def conv(v: Tensor) -> Tensor:  # the bias is a shift: it does not change Lipschitz
        return F.conv2d(v, weight, None, module.stride, module.padding, module.dilation,
                        module.groups)

    if module.padding_mode != "zeros":
        raise TypeError(f"Conv2d with padding_mode={module.padding_mode!r} is not supported")
    return _linear_map_norm(conv, module, shapes)


@layer_bound.register
def _(module: nn.Linear, shapes) -> float:
    return torch.linalg.matrix_norm(module.weight.detach().double(), ord=2).item()  # exact


@layer_bound.register(nn.AvgPool2d)
@layer_bound.register(nn.AdaptiveAvgPool2d)
def _(module: nn.Module, shapes) -> float:
    return _linear_map_norm(lambda v: module(v), module, shapes)  # linear in v


@layer_bound.register
def _(module: nn.MaxPool2d, shapes) -> float:
    """Each output is 1-Lipschitz in its window in l-infinity, hence in l2; a pixel lies in
    at most ``ceil(k / s)^2`` windows, so ``||max(a) - max(b)||_2 <= ceil(k/s) ||a - b||_2``."""
    k = module.kernel_size if isinstance(module.kernel_size, int) else max(module.kernel_size)
    s = module.stride if isinstance(module.stride, int) else min(module.stride)
    return float(math.ceil(k / s))


@layer_bound.register(nn.BatchNorm1d)
@layer_bound.register(nn.BatchNorm2d)
def _(module: nn.modules.batchnorm._BatchNorm, shapes) -> float:
    """Eval mode: ``x -> gamma (x - mean) / sqrt(var + eps) + beta``, a diagonal scaling."""
    if module.running_var is None:
        raise TypeError("BatchNorm without running statistics has no fixed eval-mode map")
    scale = 1.0 / torch.sqrt(module.running_var.double() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double().abs()
    return scale.max().item()


@layer_bound.register
def _(module: TanhHead, shapes) -> float:
    """``|t| tanh(BN(z) / |t|)``: BN's scaling times 1 (the derivative sech^2 is <= 1)."""
    return layer_bound(module.bn, shapes)


@layer_bound.register
def _(module: SmallCNN, shapes) -> float:
    return layer_bound(module.features, shapes) * layer_bound(module.fc, shapes)


@layer_bound.register
def _(module: ResNet, shapes) -> float:
    return layer_bound(module.features, shapes) * layer_bound(module.fc, shapes)


@layer_bound.register
def _(module: AllCNN, shapes) -> float:
    return layer_bound(module.net, shapes)


@layer_bound.register
def _(module: BranchBlock, shapes) -> float:
    """``ReLU(x + mean_i branch_i(x))``: ``1 + ||mean o bn2 o conv2|| ||bn1|| ||conv1||``.

    The grouped ``conv2`` and the mean over the k branches are bounded together, as one
    linear map at conv2's input size (the mean alone has norm ``1 / sqrt(k)``).
    """
    k = module.cardinality
    conv2, bn2 = module.conv2, module.bn2
    scale = 1.0 / torch.sqrt(bn2.running_var.double() + bn2.eps)
    if bn2.weight is not None:
        scale = scale * bn2.weight.detach().double().abs()

    def conv2_bn2_mean(v: Tensor) -> Tensor:  # BN's shift dropped: Lipschitz is shift-free
        y = F.conv2d(v, conv2.weight.double(), None, conv2.stride, conv2.padding,
                     conv2.dilation, conv2.groups) * scale[:, None, None]
        b, kc, h, w = y.shape
        return y.reshape(b, k, kc // k, h, w).mean(dim=1)  # (B, k*C, H, W) -> (B, C, H, W)

    branch = (layer_bound(module.conv1, shapes) * layer_bound(module.bn1, shapes)
              * _linear_map_norm(conv2_bn2_mean, conv2, shapes))
    return 1.0 + branch


@layer_bound.register
def _(module: BasicBlock, shapes) -> float:
    """torchvision's block, ``ReLU(shortcut(x) + bn2(conv2(ReLU(bn1(conv1(x))))))``."""
    branch = _product([module.conv1, module.bn1, module.conv2, module.bn2], shapes)
    shortcut = 1.0 if module.downsample is None else layer_bound(module.downsample, shapes)
    return shortcut + branch


@layer_bound.register
def _(module: TorchvisionResNet, shapes) -> float:
    parts = [module.conv1, module.bn1, module.relu, module.maxpool, module.layer1,
             module.layer2, module.layer3, module.layer4, module.avgpool, module.fc]
    return _product(parts, shapes)


def input_shapes(net: nn.Module, input_shape: tuple[int, ...]) -> dict[nn.Module, tuple]:
    """Each submodule's input shape (no batch dimension) in a forward pass of one image
    of ``input_shape``, in eval mode."""
    shapes: dict[nn.Module, tuple] = {}

    def record(module: nn.Module, args: tuple) -> None:  # None: the input is left as it is
        shapes.setdefault(module, tuple(args[0].shape[1:]))

    hooks = [m.register_forward_pre_hook(record) for m in net.modules()]
    param = next(net.parameters())
    try:
        with torch.no_grad(), eval_mode(net):
            net(torch.zeros((2, *input_shape), dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for a while: power iteration on ONE image is a long chain of
    small operations, where OpenMP's thread hand-offs cost more than they save (measured on
    2 cores with the other one busy: the small CNN's bound took 29 s with 2 threads, 0.1 s
    with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def upper_bound(net: nn.Module, input_shape: tuple[int, ...]) -> float:
    """``prod_k L_k >= L``: the data-independent l2 Lipschitz bound of ``net``'s logits on
    images of ``input_shape`` (C, H, W), batch normalization in eval mode."""
    shapes = input_shapes(net, input_shape)
    with frozen_parameters(net), _one_thread():
        return layer_bound(net, shapes)


# ---------------------------------------------------------------- the empirical lower bound


def jacobian_spectral_norms(net: nn.Module, x: Tensor, iterations: int = 20,
                            seed: int = 0) -> Tensor:
    """``||J(x_i)||_2`` estimated from below for each image of ``x`` (B, C, H, W): (B,).

    Batched power iteration on ``J^T J`` with one Jacobian-vector product (forward mode)
    and one vector-Jacobian product per step; in eval mode the images do not interact, so
    one batched call serves every image. Each returned value is ``||J v_i||`` for a unit
    ``v_i``, hence ``<= ||J(x_i)||_2`` whatever the number of iterations.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(-1, *[1] * (x.dim() - 1))
    x = x.detach()
    sigma = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    with eval_mode(net), frozen_parameters(net), torch.inference_mode(False):
        for _ in range(iterations):
            _, jv = torch.func.jvp(net, (x,), (v,))  # (B, K): J_i v_i
            sigma = torch.maximum(sigma, jv.flatten(1).norm(dim=1))
            xr = x.clone().requires_grad_(True)
            with torch.enable_grad():
                (w,) = torch.autograd.grad(net(xr), xr, grad_outputs=jv)  # J_i^T J_i v_i
            norm = w.flatten(1).norm(dim=1)
            v = torch.where((norm > 0).reshape(-1, *[1] * (x.dim() - 1)),
                            w / norm.clamp_min(1e-30).reshape(-1, *[1] * (x.dim() - 1)), v)
    return sigma.detach()
