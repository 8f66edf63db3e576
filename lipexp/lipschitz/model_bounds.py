"""Lipschitz constants of a network in l2 (docs/method.md, "Lipschitz estimates").

Two numbers bracket the Lipschitz constant ``L`` of the logits ``f`` in l2 (the smallest
``L`` with ``||f(x) - f(x')||_2 <= L ||x - x'||_2`` for all images):

- ``upper_bound(net, input_shape)``: data-independent, the product of the layers' operator
  norms (a residual block contributes ``||shortcut|| + ||branch||``), each factor PROVABLY
  at least its layer's norm, so that the product is a valid bound: a convolution's (and an
  average pooling's) norm as a linear map at the input size it actually sees, padding,
  stride, dilation and groups included (not the kernel's matrix norm), bounded through the
  circular convolution that contains it (``conv_operator_bound``: Fourier transform, exact
  per frequency); a linear layer's exactly (SVD); batch normalization in eval mode as the
  diagonal scaling ``|gamma| / sqrt(running_var + eps)``, its largest entry; ReLU, tanh and
  the tanh head's squashing are 1-Lipschitz; max pooling has a counted bound.
- ``jacobian_spectral_norms(net, x)``: empirical, per image the largest singular value of
  the input Jacobian of the logits, ``||J(x_i)||_2``. For a unit ``v``, ``||J v|| <=
  ||J||_2 <= L``, so every power-iteration iterate is already a valid lower bound; the
  iterations only tighten it.
- ``jacobian_norms(net, x)``: per image, exactly, the induced norms of ``J(x_i)`` that its
  rows give, ``||J||_{2,inf}`` (the largest row l2 norm, itself ``<= ||J||_2``) and
  ``||J||_{1,1}`` (the largest column l1 norm), and ``J^T w`` for weights of the logits (the
  evaluation's stability statistics, lipexp.evaluation.stability, are these).

``operator_norm`` (power iteration on ``A^T A``) estimates a linear map's norm from below;
the tests use it to show that the Fourier bounds are tight, and it serves maps without a
closed form. It is not used for the upper bound: after 500 iterations it was still 0.15%
below the exact norm of AllCNN's first convolution at 32x32.

Written here rather than taken from a library: torch.nn.utils.spectral_norm normalizes a
weight's matrix (the kernel's matrix norm, not the convolution's), and no dependency of
lipexp bounds a whole network.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import singledispatch

import torch
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


# ---------------------------------------------------------------- convolutions, provably


def _pair(v) -> tuple:
    """A per-axis setting (an int or a pair) as a pair."""
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_operator_bound(weight: Tensor, input_hw: tuple[int, int], stride=1, padding=0,
                        dilation=1, groups: int = 1) -> float:
    """An upper bound on the l2 operator norm of ``F.conv2d(., weight, None, stride, padding,
    dilation, groups)`` on inputs of spatial size ``input_hw``: provably ``>= sigma_max``.

    The zero-padded convolution is a restriction of the CIRCULAR convolution on a torus of
    ``N >= H + p`` pixels per side (rounded up to a multiple of the stride): place the image
    on the torus with zeros around it (an isometry; the p zeros on each side are the same
    ``N - H >= p`` zeros), convolve circularly (every read of the padded image lands on the
    same pixel or on a zero), keep the valid outputs (a restriction, norm <= 1; where the
    padding exceeds the kernel, outputs that share a torus position read only zeros, are
    identically 0 and change no norm). The
    circular strided convolution is block-diagonal in the Fourier basis after the polyphase
    split of the kernel (Sedghi et al. 2019 for stride 1): at each of the ``(N/s)^2``
    frequencies it is the ``c_out x (c_in s^2)`` matrix of the phases' DFTs, so its norm is
    the largest of those matrices' spectral norms. Groups are a block-diagonal dense kernel,
    dilation a kernel with zeros between its taps. Tight in practice (tested: within 1% of
    the exact norm at 16x16 and 15% at 8x8 for random 3x3 kernels), unlike power iteration,
    which approaches the norm from below and cannot certify it.
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    w = weight.detach().double().cpu()
    c_out, c_in_g, kh, kw = w.shape
    if groups > 1:  # block-diagonal dense kernel: (c_out, c_in_g * groups, kh, kw)
        dense = w.new_zeros(c_out, c_in_g * groups, kh, kw)
        per = c_out // groups
        for g in range(groups):
            dense[g * per:(g + 1) * per, g * c_in_g:(g + 1) * c_in_g] = w[g * per:(g + 1) * per]
        w = dense
    if dh > 1 or dw > 1:  # taps spread out, zeros between them
        dilated = w.new_zeros(w.shape[0], w.shape[1], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        dilated[:, :, ::dh, ::dw] = w
        w = dilated
    c_out, c_in, kh, kw = w.shape
    # the torus: H + p pixels suffice (the padding on both sides is then the same zeros, and
    # no valid output wraps onto a real pixel), rounded up to a multiple of the stride
    n_h = math.ceil(max(input_hw[0] + ph, kh) / sh) * sh
    n_w = math.ceil(max(input_hw[1] + pw, kw) / sw) * sw
    k = w.new_zeros(c_out, c_in, n_h, n_w)
    k[:, :, :kh, :kw] = w
    # polyphase: kernel index u*s + a -> (u, a); the phases (a, b) join the input channels
    k = k.reshape(c_out, c_in, n_h // sh, sh, n_w // sw, sw).permute(0, 1, 3, 5, 2, 4)
    k = k.reshape(c_out, c_in * sh * sw, n_h // sh, n_w // sw)
    spectrum = torch.fft.fft2(k)  # (c_out, c_in s^2, M_h, M_w)
    per_frequency = spectrum.permute(2, 3, 0, 1).reshape(-1, c_out, c_in * sh * sw)
    return torch.linalg.matrix_norm(per_frequency, ord=2).max().item()


# ---------------------------------------------------------------- the upper bound, by layer


@dataclass
class Walk:
    """What the rules need: each module's input shape (no batch dimension), and the
    modules whose maps a rule has bounded (``upper_bound`` checks that none was missed)."""

    shapes: dict[nn.Module, tuple[int, ...]]
    visited: set[nn.Module] = field(default_factory=set)

    def hw(self, module: nn.Module) -> tuple[int, int]:
        return tuple(self.shapes[module][-2:])


def layer_bound(module: nn.Module, walk: Walk) -> float:
    """The l2 Lipschitz bound of ``module`` at its recorded input shape."""
    walk.visited.add(module)
    return _rule(module, walk)


@singledispatch
def _rule(module: nn.Module, walk: Walk) -> float:
    """Unknown modules raise: a bound that silently skipped a layer would be wrong."""
    raise TypeError(f"no Lipschitz bound for {type(module).__name__}: add a rule in "
                    "lipexp/lipschitz/model_bounds.py, or set eval.lipschitz=false")


@singledispatch
def _unsupported_setting(module: nn.Module) -> str | None:
    """Why a module of a supported type has no rule with its settings (None: it has one)."""
    return None


@_unsupported_setting.register
def _(module: nn.Conv2d) -> str | None:
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return f"Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    return None


@_unsupported_setting.register
def _(module: nn.AvgPool2d) -> str | None:
    if (module.ceil_mode or module.divisor_override is not None
            or (any(_pair(module.padding)) and not module.count_include_pad)):
        return "AvgPool2d with ceil_mode, divisor_override or count_include_pad=False"
    return None


@_unsupported_setting.register
def _(module: nn.AdaptiveAvgPool2d) -> str | None:
    size = module.output_size
    if tuple(size if isinstance(size, tuple | list) else (size, size)) != (1, 1):
        return "AdaptiveAvgPool2d with an output size other than 1"
    return None


@_unsupported_setting.register
def _(module: nn.MaxPool2d) -> str | None:
    return "MaxPool2d with dilation" if _pair(module.dilation) != (1, 1) else None


@_unsupported_setting.register
def _(module: nn.modules.batchnorm._BatchNorm) -> str | None:
    return "BatchNorm without running statistics" if module.running_var is None else None


def _require_supported(module: nn.Module) -> None:
    if (why := _unsupported_setting(module)) is not None:
        raise TypeError(f"{why} has no Lipschitz rule (or set eval.lipschitz=false)")


def _product(modules, walk: Walk) -> float:
    return math.prod(layer_bound(m, walk) for m in modules)


@_rule.register
def _(module: nn.Sequential, walk) -> float:
    return _product(module, walk)


@_rule.register(nn.ReLU)
@_rule.register(nn.Tanh)
@_rule.register(nn.Identity)
@_rule.register(nn.Flatten)
@_rule.register(nn.Dropout)
def _(module: nn.Module, walk) -> float:
    return 1.0  # 1-Lipschitz (Dropout: the identity in eval mode)


@_rule.register
def _(module: nn.Conv2d, walk) -> float:
    _require_supported(module)
    # the bias is a shift: it does not change a Lipschitz constant
    return conv_operator_bound(module.weight, walk.hw(module), module.stride, module.padding,
                               module.dilation, module.groups)


@_rule.register
def _(module: nn.Linear, walk) -> float:
    return torch.linalg.matrix_norm(module.weight.detach().double(), ord=2).item()  # exact


def _average_kernel(channels: int, kh: int, kw: int) -> Tensor:
    """Average pooling as a depthwise convolution: (C, 1, kh, kw) of 1 / (kh kw)."""
    return torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=torch.float64)


@_rule.register
def _(module: nn.AvgPool2d, walk) -> float:
    _require_supported(module)
    padding = _pair(module.padding)
    kh, kw = _pair(module.kernel_size)
    stride = _pair(module.stride or module.kernel_size)
    channels = walk.shapes[module][0]
    return conv_operator_bound(_average_kernel(channels, kh, kw), walk.hw(module), stride,
                               padding, 1, channels)


@_rule.register
def _(module: nn.AdaptiveAvgPool2d, walk) -> float:
    """Global average pooling (output 1x1): each channel's mean, norm ``1 / sqrt(H W)``."""
    _require_supported(module)
    h, w = walk.hw(module)
    return 1.0 / math.sqrt(h * w)


@_rule.register
def _(module: nn.MaxPool2d, walk) -> float:
    """Each output is 1-Lipschitz in its window in l-infinity, hence in l2; a pixel lies in
    at most ``prod_d ceil(k_d / s_d)`` windows, so the bound is the square root of that."""
    _require_supported(module)
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    return math.sqrt(math.prod(math.ceil(k / s) for k, s in zip(kernel, stride)))


def _bn_scale(module: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """Eval mode: ``x -> gamma (x - mean) / sqrt(var + eps) + beta``, per channel the scale
    ``|gamma| / sqrt(var + eps)`` (gamma = 1 without affine parameters)."""
    _require_supported(module)
    scale = 1.0 / torch.sqrt(module.running_var.detach().double() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double().abs()
    return scale


@_rule.register
def _(module: nn.modules.batchnorm._BatchNorm, walk) -> float:
    """A diagonal scaling (BatchNorm1d/2d and SyncBatchNorm alike): its largest entry."""
    return _bn_scale(module).max().item()


@_rule.register
def _(module: TanhHead, walk) -> float:
    """``|t| tanh(BN(z) / |t|)``: BN's scaling times 1 (the derivative sech^2 is <= 1)."""
    walk.visited.add(module.bn)
    return _bn_scale(module.bn).max().item()


@_rule.register(SmallCNN)
@_rule.register(ResNet)
def _(module: nn.Module, walk) -> float:
    return layer_bound(module.features, walk) * layer_bound(module.fc, walk)


@_rule.register
def _(module: AllCNN, walk) -> float:
    return layer_bound(module.net, walk)


@_rule.register
def _(module: BranchBlock, walk) -> float:
    """``ReLU(x + mean_i branch_i(x))``: ``1 + ||conv1|| ||bn1|| ||mean o bn2 o conv2||``.

    The grouped ``conv2``, ``bn2``'s scaling and the mean over the k branches are one
    convolution from k*C to C channels, kernel ``K[o, i*C + c] = s[i*C + o] W2[i*C + o, c]
    / k`` (branch i's output channel o reads group i's channels c), bounded as such.
    """
    k, conv2 = module.cardinality, module.conv2
    kc, c_in_g = conv2.weight.shape[:2]  # (k*C, C) for groups=k
    c = kc // k
    w2 = conv2.weight.detach().double() * _bn_scale(module.bn2)[:, None, None, None]
    merged = w2.new_zeros(c, kc, *w2.shape[2:])  # (C, k*C, kh, kw)
    for i in range(k):
        merged[:, i * c_in_g:(i + 1) * c_in_g] = w2[i * c:(i + 1) * c] / k
    walk.visited.update({conv2, module.bn2})
    mixed = conv_operator_bound(merged, walk.hw(conv2), conv2.stride, conv2.padding,
                                conv2.dilation, 1)
    return 1.0 + layer_bound(module.conv1, walk) * layer_bound(module.bn1, walk) * mixed


@_rule.register
def _(module: BasicBlock, walk) -> float:
    """torchvision's block, ``ReLU(shortcut(x) + bn2(conv2(ReLU(bn1(conv1(x))))))``."""
    branch = _product([module.conv1, module.bn1, module.conv2, module.bn2], walk)
    shortcut = 1.0 if module.downsample is None else layer_bound(module.downsample, walk)
    return shortcut + branch


@_rule.register
def _(module: TorchvisionResNet, walk) -> float:
    parts = [module.conv1, module.bn1, module.relu, module.maxpool, module.layer1,
             module.layer2, module.layer3, module.layer4, module.avgpool, module.fc]
    return _product(parts, walk)


def input_shapes(net: nn.Module, input_shape: tuple[int, ...]) -> dict[nn.Module, tuple]:
    """Each submodule's input shape (no batch dimension) in a forward pass of one image
    of ``input_shape``, in eval mode."""
    shapes: dict[nn.Module, tuple] = {}

    def record(module: nn.Module, args: tuple) -> None:  # None: the input is left as it is
        shapes.setdefault(module, tuple(args[0].shape[1:]))

    hooks = [m.register_forward_pre_hook(record) for m in net.modules()]
    like = next(iter([*net.parameters(), *net.buffers()]), torch.zeros(()))  # dtype, device
    try:
        with torch.no_grad(), eval_mode(net):
            net(torch.zeros((2, *input_shape), dtype=like.dtype, device=like.device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def upper_bound(net: nn.Module, input_shape: tuple[int, ...]) -> float:
    """``prod_k L_k >= L``: the data-independent l2 Lipschitz bound of ``net``'s logits on
    images of ``input_shape`` (C, H, W), batch normalization in eval mode. Every factor is
    provably at least its layer's norm, so the product is a valid bound; a module with
    parameters or buffers that no rule bounded is an error, not a silent factor of 1."""
    walk = Walk(input_shapes(net, input_shape))
    with frozen_parameters(net):
        bound = layer_bound(net, walk)
    missed = [name for name, m in net.named_modules() if m not in walk.visited
              and (any(True for _ in m.parameters(recurse=False))
                   or any(True for _ in m.buffers(recurse=False)))]
    if missed:
        raise TypeError(f"the Lipschitz bound skipped {missed}: their rule is missing")
    return bound


def unsupported_layers(net: nn.Module) -> list[str]:
    """``net``'s modules without a rule: their type, or why their settings have none (a
    check before training starts; the rules refuse the same settings)."""
    missing = {type(m).__name__ for m in net.modules()
               if _rule.dispatch(type(m)) is _rule.dispatch(object)}
    missing |= {why for m in net.modules() if (why := _unsupported_setting(m)) is not None}
    return sorted(missing)


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


@dataclass(frozen=True)
class JacobianNorms:
    """Per-image norms of the input Jacobian ``J(x_i) = d f(x_i) / d x_i`` (K, n) of the
    logits, and ``J^T w`` for given weights of the logits (``jacobian_norms``)."""

    logits: Tensor  # (B, K) f(x_i), detached
    row_l2: Tensor  # (B,) ||J||_{2,inf} = max_k ||J[k, :]||_2
    col_l1: Tensor  # (B,) ||J||_{1,1} = max_j sum_k |J[k, j]|
    weighted: Tensor | None  # (B, n) J^T w_i (None without weights), n = C*H*W


def jacobian_norms(net: nn.Module, x: Tensor,
                   weights: Callable[[Tensor], Tensor] | None = None) -> JacobianNorms:
    """``||J(x_i)||_{2,inf}``, ``||J(x_i)||_{1,1}`` and ``J(x_i)^T w_i`` exactly, for each
    image of ``x`` (B, ...), with ``w = weights(f(x))`` (B, K) computed from the detached
    logits (e.g. ``softmax(f) - onehot(y)``, which makes ``J^T w`` the loss gradient).

    The model is in eval mode during the call (each module's mode is restored after) and
    only the input is differentiated, so the parameters' ``.grad`` are untouched. The
    Jacobian takes K backward passes, row ``k`` being ``grad_x sum_i f_k(x_i)``: in eval
    mode the images do not interact, so the gradient of the sum w.r.t. ``x_i`` is
    ``d f_k(x_i) / d x_i``. The rows are reduced as they come (memory O(B n), not
    O(B K n)): ``J^T w = sum_k w_k J[k, :]``.
    """
    x = x.detach().clone().requires_grad_(True)  # clone keeps the memory format
    with eval_mode(net), torch.enable_grad():
        logits = net(x)  # (B, K)
        if logits.dim() != 2:
            raise ValueError(f"expected logits of shape (B, K), got {tuple(logits.shape)}")
        b, k = logits.shape
        w = None if weights is None else weights(logits.detach())  # (B, K)
        weighted = None if w is None else x.new_zeros(b, x[0].numel())  # (B, n): J^T w
        col_l1 = x.new_zeros(b, x[0].numel())  # (B, n): sum_k |J[k, j]|
        row_l2 = x.new_zeros(b)  # (B,): max_k ||J[k, :]||_2
        for c in range(k):
            (row,) = torch.autograd.grad(logits[:, c].sum(), x, retain_graph=c < k - 1)
            row = row.flatten(1)  # (B, n), in logical (C, H, W) order for any memory format
            if weighted is not None:
                weighted += w[:, c : c + 1] * row
            col_l1 += row.abs()
            row_l2 = torch.maximum(row_l2, torch.linalg.vector_norm(row, ord=2, dim=1))
    return JacobianNorms(logits.detach(), row_l2, col_l1.amax(dim=1), weighted)
