"""The model's Lipschitz bounds bracket the truth, and certified radii are sound."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipexp.attacks.pgd import PGD
from lipexp.attacks.search import adversarial_distances
from lipexp.lipschitz.certified import certified_radii, linf_radii, margins
from lipexp.lipschitz.model_bounds import (
    Walk,
    conv_operator_bound,
    jacobian_spectral_norms,
    layer_bound,
    operator_norm,
    unsupported_layers,
    upper_bound,
)
from lipexp.models.allcnn import AllCNN
from lipexp.models.heads import TanhHead
from lipexp.models.resnet import BranchBlock, ResNet
from lipexp.models.small_cnn import SmallCNN
from lipexp.models.torchvision_resnet import imagenet_resnet

from ..helpers import linear_model

pytestmark = pytest.mark.usefixtures("one_thread")


def explicit_matrix(fn, shape, device="cpu") -> torch.Tensor:
    """The matrix of the linear map ``fn`` on inputs of ``shape``: (outputs, inputs)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64, device=device).reshape(n, *shape)
    return fn(basis).reshape(n, -1).T


CONVS = [  # stride, padding, dilation, groups, side
    (1, 1, 1, 1, 8), (2, 1, 1, 1, 8), (1, 0, 1, 1, 8), (1, 1, 1, 2, 8), (2, 1, 1, 2, 7),
    (1, 2, 2, 1, 8), (3, 0, 1, 1, 9), (1, 1, 1, 1, 16)]


@pytest.mark.numerics
@pytest.mark.parametrize("stride,padding,dilation,groups,side", CONVS)
def test_convolution_norms_at_their_input_size(stride, padding, dilation, groups, side, device):
    """Power iteration equals the largest singular value of the convolution's explicit matrix
    (within 1e-3, from below); the Fourier bound is above it, by a few % at most (<= 1% on
    16x16, where the border matters less); the kernel's matrix norm is neither."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=False).to(device, torch.float64)
    shape = (4, side, side)
    exact = torch.linalg.matrix_norm(explicit_matrix(conv, shape, device), ord=2).item()
    found = operator_norm(conv, shape, device=device)
    assert found == pytest.approx(exact, rel=1e-3) and found <= exact * (1 + 1e-9)
    bound = conv_operator_bound(conv.weight, (side, side), stride, padding, dilation, groups)
    assert exact * (1 - 1e-9) <= bound <= exact * (1.01 if side == 16 else 1.15)
    kernel = torch.linalg.matrix_norm(conv.weight.detach().cpu().reshape(6, -1), ord=2).item()
    if stride < 3:  # (stride 3 without padding: disjoint windows, where the two coincide)
        assert abs(found - kernel) > 1e-3 * exact  # the map at its size, not the kernel's


@pytest.mark.numerics
def test_the_fourier_bound_holds_for_every_convolution_setting():
    """Rectangular inputs and kernels, per-axis stride / padding / dilation, padding beyond
    the kernel, a kernel larger than the image, 1x1 kernels with stride 2, groups with
    c_out != c_in: never below the exact norm."""
    g = torch.Generator().manual_seed(0)
    cases = [  # c_in, c_out, kernel, stride, padding, dilation, groups, (H, W)
        (2, 3, (3, 2), (2, 1), (1, 0), (1, 2), 1, (7, 5)), (4, 6, 1, 2, 0, 1, 2, (6, 6)),
        (2, 2, 3, 1, 4, 1, 1, (3, 3)), (1, 2, 5, 1, 4, 1, 1, (3, 4)),
        (2, 4, 3, 4, (2, 1), 2, 2, (9, 6)), (3, 3, (1, 3), (1, 3), (0, 2), 1, 3, (5, 8))]
    for c_in, c_out, k, s, p, d, groups, hw in cases:
        kh, kw = (k, k) if isinstance(k, int) else k
        w = torch.randn(c_out, c_in // groups, kh, kw, generator=g, dtype=torch.float64)

        def conv(v, w=w, s=s, p=p, d=d, groups=groups):
            return F.conv2d(v, w, None, s, p, d, groups)

        exact = torch.linalg.matrix_norm(explicit_matrix(conv, (c_in, *hw)), ord=2).item()
        assert conv_operator_bound(w, hw, s, p, d, groups) >= exact * (1 - 1e-9)


@pytest.mark.parametrize("layer", [nn.Conv2d(2, 2, 3, padding="same"),
                                   nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"),
                                   nn.AvgPool2d(2, ceil_mode=True),
                                   nn.AvgPool2d(3, 1, 1, divisor_override=1),
                                   nn.AdaptiveAvgPool2d(2), nn.MaxPool2d(3, dilation=2),
                                   nn.BatchNorm2d(2, track_running_stats=False)])
def test_settings_without_a_rule_are_refused_before_any_work(layer):
    net = nn.Sequential(layer, nn.Flatten())
    (why,) = unsupported_layers(net)
    with pytest.raises(TypeError, match="has no Lipschitz rule"):
        upper_bound(net, (2, 8, 8))
    assert type(layer).__name__.startswith(why.split(" ")[0])  # it names the layer


@pytest.mark.parametrize("pool,shape", [(nn.AvgPool2d(2), (3, 8, 8)),
                                        (nn.AvgPool2d(3, stride=2, padding=1), (2, 7, 7)),
                                        (nn.AdaptiveAvgPool2d(1), (3, 4, 6))])
@pytest.mark.numerics
def test_average_pooling_bounds_are_its_norm(pool, shape):
    exact = torch.linalg.matrix_norm(explicit_matrix(pool, shape), ord=2).item()
    walk = Walk({pool: shape})
    assert exact * (1 - 1e-9) <= layer_bound(pool, walk) <= exact * 1.15
    if not isinstance(pool, nn.AvgPool2d) or pool.padding == 0:
        assert layer_bound(pool, walk) == pytest.approx(exact, rel=1e-9)  # closed form


@pytest.mark.numerics
def test_the_resnext_branch_map_is_bounded_as_one_convolution(device):
    """mean over k branches of bn2(grouped conv2): bounded together, above its exact norm
    and well below the product of the parts (the mean's 1/sqrt(k) and more)."""
    torch.manual_seed(0)
    block = BranchBlock(3, cardinality=2).double().eval()
    block.bn2.running_var = torch.rand(6, dtype=torch.float64) + 0.5
    block.bn2.weight.data = torch.randn(6, dtype=torch.float64)
    block.to(device)

    def mixed(v):  # (B, k*C, H, W) -> (B, C, H, W)
        y = block.bn2(block.conv2(v)) - block.bn2(block.conv2(torch.zeros_like(v)))
        return y.reshape(len(v), 2, 3, *y.shape[2:]).mean(dim=1)

    exact = torch.linalg.matrix_norm(explicit_matrix(mixed, (6, 8, 8), device), ord=2).item()
    walk = Walk({block: (3, 8, 8), block.conv1: (3, 8, 8), block.bn1: (6, 8, 8),
                 block.conv2: (6, 8, 8)})
    branch = layer_bound(block, walk) - 1.0
    parts = layer_bound(block.conv1, walk) * layer_bound(block.bn1, walk)
    assert exact * (1 - 1e-9) <= branch / parts <= exact * 1.15
    assert {block.conv2, block.bn2} <= walk.visited


def test_max_pooling_bound_holds():
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    bound = layer_bound(pool, Walk({pool: (1, 9, 9)}))
    assert bound == 2.0  # a pixel is in at most 2 x 2 windows
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 1, 9, 9, generator=g)
    b = a + 1e-3 * torch.randn(200, 1, 9, 9, generator=g)
    ratio = (pool(a) - pool(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratio.max() <= bound


def test_every_layer_is_bounded_or_refused():
    assert unsupported_layers(nn.Sequential(nn.Linear(4, 4), nn.GELU())) == ["GELU"]
    assert unsupported_layers(nn.Sequential(SmallCNN(10, 1, 4), TanhHead(10))) == []
    with pytest.raises(TypeError, match="no Lipschitz bound for GELU"):
        upper_bound(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.GELU()), (1, 2, 2))

    class Sneaky(nn.Sequential):  # a container whose rule ignores a layer with weights
        pass

    from lipexp.lipschitz import model_bounds

    model_bounds._rule.register(Sneaky, lambda module, walk: 1.0)
    with pytest.raises(TypeError, match="skipped"):
        upper_bound(nn.Sequential(nn.Flatten(), Sneaky(nn.Linear(4, 4))), (1, 2, 2))


def test_sync_batch_norm_has_the_rule_of_batch_norm():
    bn, sync = nn.BatchNorm2d(3), nn.SyncBatchNorm(3)
    for m in (bn, sync):
        m.running_var = torch.tensor([4.0, 0.25, 1.0])
    assert layer_bound(sync, Walk({})) == layer_bound(bn, Walk({}))


@pytest.mark.numerics
def test_a_linear_layer_and_a_linear_model_have_both_bounds_equal_to_sigma_max(device):
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    sigma = torch.linalg.svdvals(layer.weight.detach())[0].item()
    net = nn.Sequential(nn.Flatten(), layer).to(device)
    assert upper_bound(net, (3, 2, 2)) == pytest.approx(sigma, rel=1e-6)
    x = torch.rand(4, 3, 2, 2).to(device)
    lower = jacobian_spectral_norms(net, x, iterations=50)
    assert lower.device == x.device
    torch.testing.assert_close(lower.cpu(), torch.full((4,), sigma), rtol=1e-4, atol=0)


@pytest.mark.numerics
def test_batch_norm_is_its_diagonal_scaling_in_eval_mode(device):
    bn = nn.BatchNorm2d(3)
    bn.running_var = torch.tensor([4.0, 0.25, 1.0])
    bn.weight.data = torch.tensor([1.0, -2.0, 0.5])
    bn.to(device)
    assert layer_bound(bn, Walk({})) == pytest.approx(2.0 / math.sqrt(0.25 + bn.eps))


def study_models():
    """Every model of the study at small width with each head, and lipexp's extras."""
    models = [("small_cnn", lambda: SmallCNN(10, 1, 4), (1, 8, 8)),
              ("resnet", lambda: ResNet(10, 3, (4, 8), 2, 1), (3, 16, 16)),
              ("resnext", lambda: ResNet(10, 3, (4, 8), 2, 2), (3, 16, 16)),
              ("allcnn", lambda: AllCNN(10, 3), (3, 8, 8))]
    return [(f"{name}-{head}", make, shape, head) for name, make, shape in models
            for head in ("linear", "tanh")] + [
        ("imagenet_resnet18-linear", lambda: imagenet_resnet(10, 3, 18), (3, 8, 8), "linear")]


def trained(net: nn.Module, shape, steps: int = 10) -> nn.Module:
    """A few SGD steps on random labels (drawn on the CPU, moved to the net's device): BN
    statistics and weights move off their init (gently: a saturated tanh head would make
    every gradient exactly 0 in float32)."""
    g = torch.Generator().manual_seed(3)
    device = next(net.parameters()).device
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    for _ in range(steps):
        x, y = torch.rand(16, *shape, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x.to(device)), y.to(device)).backward()
        opt.step()
    return net.eval()


@pytest.mark.parametrize("name,make,shape,head", study_models(),
                         ids=[m[0] for m in study_models()])
def test_the_upper_bound_is_above_the_empirical_one(name, make, shape, head, device):
    torch.manual_seed(0)
    for net in (nn.Sequential(make(), TanhHead(10) if head == "tanh" else nn.Identity()),):
        net.to(device)
        for state in ("random", "trained"):
            if state == "trained":
                net = trained(net, shape)
            net.eval()
            x = torch.rand(6, *shape).to(device)
            lower = jacobian_spectral_norms(net, x, iterations=30).max().item()
            upper = upper_bound(net, shape)
            assert 0 < lower <= upper, (state, lower, upper)


@pytest.mark.numerics
def test_certified_radius_of_a_linear_model_is_what_the_bound_predicts(device):
    """f = W x + b: L = sigma_max(W); the exact distance is min_j m_j / ||w_y - w_j||_2 and
    the certified radius min_j m_j / (sqrt(2) sigma_max)."""
    net = linear_model(16, 5, torch.float64, 0, device=device).eval()
    w = net[1].weight.detach()
    sigma = torch.linalg.svdvals(w)[0].item()
    x = torch.rand(40, 1, 4, 4, dtype=torch.float64).to(device)
    logits = net(x)
    y = logits.argmax(1)
    y[:5] = (y[:5] + 1) % 5  # a few misclassified images: radius 0
    r = certified_radii(logits, y, sigma)
    m = logits.gather(1, y[:, None]) - logits  # (B, K) margins m_j
    dist = (m / (w[y][:, None, :] - w[None]).norm(dim=2)).scatter(1, y[:, None], torch.inf)
    exact = dist.min(dim=1).values.clamp_min(0)
    assert (r[:5] == 0).all() and (r[5:] > 0).all()
    assert (r <= exact + 1e-12).all()
    predicted = margins(logits, y).clamp_min(0) / (math.sqrt(2) * sigma)
    torch.testing.assert_close(r, predicted)
    torch.testing.assert_close(r[5:] / exact[5:], (m.scatter(1, y[:, None], torch.inf).min(1)
                               .values / math.sqrt(2) / sigma / exact)[5:])


def test_certified_radii_never_exceed_pgd_distances(device):
    torch.manual_seed(1)
    net = nn.Sequential(SmallCNN(10, 1, 4), TanhHead(10)).to(device)
    net = trained(net, (1, 8, 8), steps=30)
    x = torch.rand(24, 1, 8, 8).to(device)
    logits = net(x).detach()
    y = logits.argmax(1)
    y[::4] = torch.randint(0, 10, (6,)).to(device)
    r2 = certified_radii(logits, y, upper_bound(net, (1, 8, 8)))
    for norm, r in [("l2", r2), ("linf", linf_radii(r2, 64))]:
        d = adversarial_distances(net, x, y, PGD(norm, steps=10, targets=3), norm,
                                  eps_init=0.01, eps_max=50.0)
        assert (r <= d).all()
