"""Tests of lipexp.models: shapes, parameter counts (docs/method.md), branch mean, double
backpropagation, channels_last and the tanh logit layer. Small batches; double
backpropagation and channels_last also on CUDA (pytest -m gpu)."""

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipexp.models.allcnn import AllCNN
from lipexp.models.heads import TanhHead
from lipexp.models.resnet import BranchBlock, ResNet
from lipexp.models.small_cnn import SmallCNN
from lipexp.models.torchvision_resnet import imagenet_resnet

# name -> builder(num_classes, in_channels)
BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": lambda k, c: SmallCNN(k, c),
    "allcnn": lambda k, c: AllCNN(k, c),
    "resnet34": lambda k, c: ResNet(k, c),
    "resnext34": lambda k, c: ResNet(k, c, widths=(32, 64, 128), cardinality=2),
    "tv_resnet18": lambda k, c: imagenet_resnet(k, c, depth=18),
    "tv_resnet34": lambda k, c: imagenet_resnet(k, c, depth=34),
}
# (model, input shape (C, H, W))
SHAPE_CASES = [
    ("small_cnn", (1, 8, 8)),
    ("small_cnn", (1, 28, 28)),
    ("allcnn", (3, 32, 32)),
    ("allcnn", (1, 28, 28)),
    ("resnet34", (3, 32, 32)),
    ("resnet34", (1, 28, 28)),
    ("resnext34", (3, 32, 32)),
    ("resnext34", (1, 28, 28)),
    ("tv_resnet18", (3, 32, 32)),
    ("tv_resnet34", (3, 32, 32)),
]
# one input shape per model for the slower tests
MAIN_SHAPE = {
    "small_cnn": (1, 8, 8),
    "allcnn": (3, 32, 32),
    "resnet34": (3, 32, 32),
    "resnext34": (3, 32, 32),
    "tv_resnet18": (3, 32, 32),
    "tv_resnet34": (3, 32, 32),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize(("name", "shape"), SHAPE_CASES)
def test_output_shape(name: str, shape: tuple[int, int, int], num_classes: int) -> None:
    model = BUILDERS[name](num_classes, shape[0])
    x = torch.rand(2, *shape)  # pixels in [0, 1]
    with torch.no_grad():
        assert model(x).shape == (2, num_classes)  # train mode
        assert model.eval()(x).shape == (2, num_classes)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize(
    ("name", "expected"), [("allcnn", 1.7e6), ("resnet34", 0.5e6), ("resnext34", 3.9e6)]
)
def test_parameter_count(name: str, expected: float, num_classes: int) -> None:
    """docs/method.md, "Models": about 1.7M, 0.5M and 3.9M parameters."""
    count = n_params(BUILDERS[name](num_classes, 3))
    assert abs(count - expected) <= 0.1 * expected, f"{name}: {count} parameters"


def test_resnext_cardinality_4() -> None:
    """The study's CIFAR-100 ResNeXt-34 has 4 branches."""
    model = ResNet(100, widths=(32, 64, 128), cardinality=4)
    blocks = [m for m in model.modules() if isinstance(m, BranchBlock)]
    assert len(blocks) == 15 and all(b.conv2.groups == 4 for b in blocks)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.numerics
def test_branch_mean() -> None:
    """The block output is ReLU(x + mean of k branches), each branch computed on its own
    from slices of the dense and grouped convolutions (fails for a sum or a concat)."""
    c, k = 4, 3
    block = BranchBlock(c, cardinality=k)
    for bn in (block.bn1, block.bn2):  # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    block.eval()
    x = torch.randn(2, c, 6, 6)

    def bn(y: torch.Tensor, layer: nn.BatchNorm2d, s: slice) -> torch.Tensor:
        return F.batch_norm(
            y,
            layer.running_mean[s],
            layer.running_var[s],
            layer.weight[s],
            layer.bias[s],
            training=False,
            eps=layer.eps,
        )

    branches = []
    for i in range(k):
        s = slice(i * c, (i + 1) * c)  # branch i's channels
        y = F.relu(bn(F.conv2d(x, block.conv1.weight[s], padding=1), block.bn1, s))
        branches.append(bn(F.conv2d(y, block.conv2.weight[s], padding=1), block.bn2, s))
    expected = F.relu(x + torch.stack(branches).mean(dim=0))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "tanh"), [(n, False) for n in BUILDERS] + [("small_cnn", True), ("resnet34", True)]
)
def test_double_backprop(name: str, tanh: bool, device: torch.device) -> None:
    """The Lipschitz penalty's path: grad of ||grad_x CE|| reaches every conv weight
    (and the tanh head's t when the head is on); on CUDA through cuDNN's kernels."""
    shape = MAIN_SHAPE[name]
    model = BUILDERS[name](10, shape[0])
    head = TanhHead(10)
    if tanh:
        model = nn.Sequential(model, head)
    model.to(device).train()  # batch norm in train mode, as in training
    x = torch.rand(4, *shape).to(device).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3], device=device)
    loss = F.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    g.norm().backward()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for conv in convs:
        grad = conv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    if tanh:
        assert head.t.grad is not None and torch.isfinite(head.t.grad)


@pytest.mark.numerics
@pytest.mark.parametrize("name", list(BUILDERS))
def test_channels_last(name: str, device: torch.device) -> None:
    """channels_last inputs (and model) give the outputs of contiguous ones, eval mode.
    Tolerance: oneDNN's NHWC and NCHW float32 kernels agree to ~1e-6; cuDNN (TF32 off) picks
    its algorithm per layout (Winograd or FFT-based ones among them), ~1e-5 per layer over
    up to 34 layers: 1e-4 there."""
    shape = (1, 28, 28) if name == "small_cnn" else MAIN_SHAPE[name]
    model = BUILDERS[name](10, shape[0]).to(device)
    for m in model.modules():  # running stats = the statistics of one batch
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    x = torch.rand(4, *shape).to(device)
    with torch.no_grad():
        model(x)  # train mode: fills the running statistics
        model.eval()
        out = model(x)
        out_cl = model(x.to(memory_format=torch.channels_last))
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out_cl2 = model_cl(x.to(memory_format=torch.channels_last))
    tol = {"atol": 1e-4, "rtol": 1e-4} if device.type == "cuda" else {"atol": 1e-5, "rtol": 0}
    torch.testing.assert_close(out_cl, out, **tol)
    torch.testing.assert_close(out_cl2, out, **tol)
    assert out_cl2.device == x.device


def test_imagenet_resnet_depth() -> None:
    with pytest.raises(ValueError, match="18, 34"):
        imagenet_resnet(10, depth=50)


# --- TanhHead ---------------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("t_init", [1.0, 3.0, -0.5])
def test_tanh_head_bounded(t_init: float) -> None:
    """|output| <= |t|, also for negative t and huge inputs (train and eval mode). Saturated,
    the output is |t| itself, on the bound: it holds as long as the tanh kernel returns at
    most 1 (and |t| * . rounds monotonically)."""
    head = TanhHead(10, t_init=t_init)
    z = 1e4 * torch.randn(32, 10)
    with torch.no_grad():
        assert (head(z).abs() <= abs(t_init)).all()
        out = head.eval()(z)  # running stats still (0, 1): the tanh saturates
    assert (out.abs() <= abs(t_init)).all()
    assert out.abs().max() > 0.99 * abs(t_init)


def test_tanh_head_parameters() -> None:
    """t is the only parameter (learnable, receives a gradient); BN has no affine ones."""
    head = TanhHead(5, t_init=2.0)
    assert head.bn.weight is None and head.bn.bias is None and not head.bn.affine
    params = dict(head.named_parameters())
    assert list(params) == ["t"] and isinstance(head.t, nn.Parameter)
    assert head.t.requires_grad and head.t.shape == () and head.t.item() == 2.0
    head(3 * torch.randn(8, 5)).square().sum().backward()
    assert head.t.grad is not None and torch.isfinite(head.t.grad) and head.t.grad != 0


@pytest.mark.numerics
def test_tanh_head_formula() -> None:
    """Train mode: |t| tanh(((z - mean) / sqrt(var + eps)) / |t|), batch statistics."""
    t = -2.5
    head = TanhHead(5, t_init=t)
    z = 3 * torch.randn(8, 5) + 2
    mean, var = z.mean(dim=0), z.var(dim=0, unbiased=False)  # BN's biased batch variance
    expected = abs(t) * torch.tanh((z - mean) / torch.sqrt(var + head.bn.eps) / abs(t))
    torch.testing.assert_close(head(z), expected, atol=1e-6, rtol=1e-6)


def test_tanh_head_zero_t() -> None:
    with pytest.raises(ValueError):
        TanhHead(5, t_init=0.0)
