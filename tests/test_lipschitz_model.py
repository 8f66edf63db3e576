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
    jacobian_spectral_norms,
    layer_bound,
    operator_norm,
    upper_bound,
)
from lipexp.models.allcnn import AllCNN
from lipexp.models.heads import TanhHead
from lipexp.models.resnet import ResNet
from lipexp.models.small_cnn import SmallCNN
from lipexp.models.torchvision_resnet import imagenet_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


def explicit_matrix(fn, shape) -> torch.Tensor:
    """The matrix of the linear map ``fn`` on inputs of ``shape``: (outputs, inputs)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    return fn(basis).reshape(n, -1).T


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 1, 1), (1, 0, 1), (1, 1, 2)])
def test_power_iteration_equals_the_explicit_matrix_of_a_convolution(stride, padding, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, groups=groups, bias=False).double()
    exact = torch.linalg.matrix_norm(explicit_matrix(conv, (4, 8, 8)), ord=2).item()
    found = operator_norm(conv, (4, 8, 8))
    assert found == pytest.approx(exact, rel=1e-3) and found <= exact * (1 + 1e-9)
    kernel = torch.linalg.matrix_norm(conv.weight.detach().reshape(6, -1), ord=2).item()
    assert abs(found - kernel) > 1e-3 * exact  # the map at its size, not the kernel's matrix


def test_a_linear_layer_and_a_linear_model_have_both_bounds_equal_to_sigma_max():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    sigma = torch.linalg.svdvals(layer.weight.detach())[0].item()
    net = nn.Sequential(nn.Flatten(), layer)
    assert upper_bound(net, (3, 2, 2)) == pytest.approx(sigma, rel=1e-6)
    x = torch.rand(4, 3, 2, 2)
    lower = jacobian_spectral_norms(net, x, iterations=50)
    torch.testing.assert_close(lower, torch.full((4,), sigma), rtol=1e-4, atol=0)


def test_batch_norm_is_its_diagonal_scaling_in_eval_mode():
    bn = nn.BatchNorm2d(3)
    bn.running_var = torch.tensor([4.0, 0.25, 1.0])
    bn.weight.data = torch.tensor([1.0, -2.0, 0.5])
    assert layer_bound(bn, {}) == pytest.approx(2.0 / math.sqrt(0.25 + bn.eps))


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
    """A few SGD steps on random labels: BN statistics and weights move off their init
    (gently: a saturated tanh head would make every gradient exactly 0 in float32)."""
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    for _ in range(steps):
        x, y = torch.rand(16, *shape, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.mark.parametrize("name,make,shape,head", study_models(),
                         ids=[m[0] for m in study_models()])
def test_the_upper_bound_is_above_the_empirical_one(name, make, shape, head):
    torch.manual_seed(0)
    for net in (nn.Sequential(make(), TanhHead(10) if head == "tanh" else nn.Identity()),):
        for state in ("random", "trained"):
            if state == "trained":
                net = trained(net, shape)
            net.eval()
            x = torch.rand(6, *shape)
            lower = jacobian_spectral_norms(net, x, iterations=30).max().item()
            upper = upper_bound(net, shape)
            assert 0 < lower <= upper, (state, lower, upper)


def test_unknown_layers_are_refused():
    with pytest.raises(TypeError, match="no Lipschitz bound for GELU"):
        upper_bound(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.GELU()), (1, 2, 2))


def linear_model(k=5, side=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, k)).double().eval()


def test_certified_radius_of_a_linear_model_is_what_the_bound_predicts():
    """f = W x + b: L = sigma_max(W); the exact distance is min_j m_j / ||w_y - w_j||_2 and
    the certified radius min_j m_j / (sqrt(2) sigma_max)."""
    net = linear_model()
    w = net[1].weight.detach()
    sigma = torch.linalg.svdvals(w)[0].item()
    x = torch.rand(40, 1, 4, 4, dtype=torch.float64)
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


def test_certified_radii_never_exceed_pgd_distances():
    torch.manual_seed(1)
    net = nn.Sequential(SmallCNN(10, 1, 4), TanhHead(10))
    net = trained(net, (1, 8, 8), steps=30)
    x = torch.rand(24, 1, 8, 8)
    logits = net(x).detach()
    y = logits.argmax(1)
    y[::4] = torch.randint(0, 10, (6,))
    r2 = certified_radii(logits, y, upper_bound(net, (1, 8, 8)))
    for norm, r in [("l2", r2), ("linf", linf_radii(r2, 64))]:
        d = adversarial_distances(net, x, y, PGD(norm, steps=10, targets=3), norm,
                                  eps_init=0.01, eps_max=50.0)
        assert (r <= d).all()
