"""Adversarial perturbations and Lipschitz penalties against closed forms and independent
computations (docs/method.md's formulas)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lipexp.config.schema import Scaling
from lipexp.defences.adversarial import (
    input_gradient,
    l2_gradient_step,
    no_perturbation,
    signed_gradient_step,
)
from lipexp.defences.penalty import cross_entropy, penalized_cross_entropy

from ..helpers import DEFENCE_K, DEFENCE_SHAPE, linear_loss_gradient, linear_model
from ..helpers import defence_batch as batch

# Every test here compares float64 results with a closed form or an independent computation
# (default float64 tolerances of assert_close), on the CPU and, under -m gpu, on CUDA.
pytestmark = pytest.mark.numerics
(C, H, W), K = DEFENCE_SHAPE, DEFENCE_K  # tiny images: channels, height, width; classes
N = C * H * W


def test_input_gradient_matches_closed_form(device):
    model, (x, y) = linear_model(N, K, torch.float64, 0, device=device), batch(device=device)
    torch.testing.assert_close(input_gradient(model, x, y), linear_loss_gradient(model, x, y))


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_signed_gradient_step_closed_form_and_l2_size(eps, device):
    model, (x, y) = linear_model(N, K, torch.float64, 0, device=device), batch(device=device)
    x_adv = signed_gradient_step(model, x, y, eps=eps, clip=False)
    g = linear_loss_gradient(model, x, y)
    torch.testing.assert_close(x_adv, x + eps * g.sign() / math.sqrt(N))
    sizes = (x_adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(sizes, torch.full_like(sizes, eps))


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_l2_gradient_step_closed_form_and_l2_size(eps, device):
    model, (x, y) = linear_model(N, K, torch.float64, 0, device=device), batch(device=device)
    x_adv = l2_gradient_step(model, x, y, eps=eps, clip=False)
    g = linear_loss_gradient(model, x, y)
    expected = x + eps * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_adv, expected)
    sizes = (x_adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(sizes, torch.full_like(sizes, eps))


def test_perturbations_increase_loss_and_clip(device):
    model, (x, y) = linear_model(N, K, torch.float64, 0, device=device), batch(device=device)
    clean = F.cross_entropy(model(x), y, reduction="none")
    for attack in (signed_gradient_step, l2_gradient_step):
        assert (F.cross_entropy(model(attack(model, x, y, eps=0.1, clip=False)), y,
                                reduction="none") > clean).all()
        big = attack(model, x, y, eps=5.0, clip=True)  # far outside the box before clipping
        assert big.min() >= 0 and big.max() <= 1
    assert no_perturbation(model, x, y) is x


def test_perturbation_uses_eval_mode_and_leaves_model_as_found(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * H * W, K)).to(device, torch.float64)
    model[1].running_mean.fill_(0.3)  # eval-mode BN differs from train-mode BN
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    x, y = batch(device=device)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    g = input_gradient(model, x, y)
    model.eval()
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    model.train()
    torch.testing.assert_close(g, expected)
    assert all(m.training for m in model.modules())
    assert all((p.grad == 1).all() for p in model.parameters())  # no gradient leaked in
    for k, v in model.state_dict().items():  # BN running stats untouched
        torch.testing.assert_close(v, buffers[k])


def per_example_grad_norms(model: nn.Module, x, y, norm: int):
    """Independent computation: torch.func per-sample gradients (model without BN)."""
    params = dict(model.named_parameters())

    def loss(xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])

    g = vmap(grad(loss))(x, y)  # (B, C, H, W)
    return torch.linalg.vector_norm(g.flatten(1), ord=norm, dim=1)


def mlp(device="cpu", dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(N, 8), nn.Tanh(),
                         nn.Linear(8, K)).to(device, dtype)


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("scaling", list(Scaling))
@pytest.mark.parametrize("target,squared", [(None, False), (None, True), (0.5, False),
                                            (0.5, True), (1e6, False)])
def test_penalty_equals_per_example_computation(norm, scaling, target, squared, device):
    model, (x, y) = mlp(device), batch(b=8, device=device)
    lam, sqrt_n = 0.7, norm == 1
    loss, logs = penalized_cross_entropy(model, x, y, dual_norm=norm, lam=lam,
                                         lam_over_sqrt_n=sqrt_n, scaling=scaling, target=target,
                                         squared=squared)
    norms = per_example_grad_norms(model, x, y, norm)
    largest = norms.max()  # the hinge target is in per-example units, as logged
    excess = largest if target is None else (largest - target).clamp_min(0)
    weight = lam / math.sqrt(N) if sqrt_n else lam
    weight /= len(x) if scaling is Scaling.batch_mean else 1
    penalty = weight * (excess**2 if squared else excess)
    ce = F.cross_entropy(model(x), y)
    torch.testing.assert_close(logs["penalty"], penalty.to(logs["penalty"].dtype))
    torch.testing.assert_close(loss, ce + penalty)
    torch.testing.assert_close(logs["grad_norm_max"], norms.max())
    torch.testing.assert_close(logs["grad_norm_mean"], norms.mean())
    torch.testing.assert_close(logs["ce"], ce)


def test_penalty_gradient_is_the_gradient_of_the_worst_example(device):
    """d/dtheta of lam * max_i ||g_i|| is lam * d/dtheta ||g_k|| for the argmax k."""
    model, (x, y) = mlp(device), batch(b=8, device=device)
    loss, _ = penalized_cross_entropy(model, x, y, dual_norm=2, lam=1.0, scaling="per_example")
    ce = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss - ce, list(model.parameters()))
    k = per_example_grad_norms(model, x, y, 2).argmax()
    xk = x[k:k + 1].clone().requires_grad_(True)
    (gk,) = torch.autograd.grad(F.cross_entropy(model(xk), y[k:k + 1]), xk, create_graph=True)
    expected = torch.autograd.grad(gk.norm(), list(model.parameters()))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("scaling", ["per_example", "batch_mean"])
def test_penalty_passes_gradcheck(norm, scaling, device):
    model, (x, y) = mlp(device), batch(b=4, device=device)
    names = [n for n, _ in model.named_parameters()]

    def objective(*params):
        net = lambda inp: functional_call(model, dict(zip(names, params)), (inp,))  # noqa: E731
        return penalized_cross_entropy(net, x, y, dual_norm=norm, lam=0.5, scaling=scaling,
                                 target=0.01, squared=True)[0]

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(objective, params, eps=1e-6, atol=1e-5)


def test_cross_entropy_objective(device):
    model, (x, y) = mlp(device), batch(device=device)
    loss, logs = cross_entropy(model, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    torch.testing.assert_close(logs["acc"], (model(x).argmax(1) == y).float().mean())
