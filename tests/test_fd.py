"""The finite-difference penalty (lip.method=fd): against the hand formula, against the exact
norm on a smooth model, its parameter gradient, its forward passes, and its settings."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lipexp.defences.finite_difference as fdm
from lipexp.config import validate
from lipexp.defences.adversarial import l2_gradient_step
from lipexp.defences.finite_difference import (
    adversarial_fd_objective,
    fd_grad_norms,
    share_adversarial_passes,
)
from lipexp.defences.lipschitz import exact_grad_norms, penalized_cross_entropy

from .conftest import build_run

pytestmark = pytest.mark.usefixtures("one_thread")
C, H, W, K = 2, 3, 3, 4
N = C * H * W


def smooth_model(dtype=torch.float64) -> nn.Module:
    """Softplus everywhere: no kinks, so the finite difference is O(h) accurate."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.Softplus(), nn.Flatten(),
                         nn.Linear(4 * H * W, 8), nn.Softplus(), nn.Linear(8, K)).to(dtype)


def batch(b: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, C, H, W, generator=g, dtype=dtype) * 0.5 + 0.25
    return x, torch.randint(0, K, (b,), generator=g)


def hand_fd(model, x, y, dual_norm, h):
    """(l(x + h d) - l(x)) / h by hand, times sqrt(n) for the l1 norm."""
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    if dual_norm == 2:
        d = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    else:
        d = g.sign() / math.sqrt(N)
    q = (F.cross_entropy(model(x + h * d), y, reduction="none")
         - F.cross_entropy(model(x), y, reduction="none")) / h
    return q * math.sqrt(N) if dual_norm == 1 else q


@pytest.mark.parametrize("dual_norm", [1, 2])
def test_fd_equals_the_hand_formula(dual_norm):
    model, (x, y) = smooth_model(), batch()
    est = fd_grad_norms(model, x, y, dual_norm, h=0.05)
    torch.testing.assert_close(est.norms, hand_fd(model, x, y, dual_norm, 0.05))
    torch.testing.assert_close(est.losses, F.cross_entropy(model(x), y, reduction="none"))


@pytest.mark.parametrize("dual_norm", [1, 2])
def test_fd_converges_to_the_exact_norm(dual_norm):
    model, (x, y) = smooth_model(), batch(b=16)
    exact = exact_grad_norms(model, x, y, dual_norm).norms.detach()
    errors = [((fd_grad_norms(model, x, y, dual_norm, h).norms.detach() - exact).abs()
               / exact).max().item() for h in (0.3, 0.1, 0.01, 0.001)]
    assert errors[2] < 0.02  # within 2% at the default h = 0.01
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 50  # O(h)


@pytest.mark.parametrize("dual_norm", [1, 2])
def test_fd_penalty_gradient_flows_through_both_losses(dual_norm, monkeypatch):
    """gradcheck with d held fixed (it is detached by definition): the analytic gradient
    must include both l(x + h d) and l(x); dropping either fails."""
    model, (x, y) = smooth_model(), batch(b=4)
    names = [n for n, _ in model.named_parameters()]
    d0 = fdm.unit_direction(torch.randn(4, C, H, W, dtype=torch.float64), dual_norm)
    monkeypatch.setattr(fdm, "unit_direction", lambda g, norm: d0)

    def objective(*params):
        net = lambda inp: functional_call(model, dict(zip(names, params)), (inp,))  # noqa: E731
        return penalized_cross_entropy(net, x, y, dual_norm=dual_norm, lam=0.5,
                                       scaling="per_example", method="fd", h=0.1)[0]

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(objective, params, eps=1e-6, atol=1e-5)


def test_reused_objective_equals_its_formula():
    """J = mean l(x_adv) + lam * max_i (l(x_adv_i) - l(x_i)) / eps, x_adv the J2 image."""
    model, (x, y) = smooth_model(), batch()
    eps, lam = 0.05, 0.3
    loss, logs = adversarial_fd_objective(model, x, y, eps=eps, clip=False, dual_norm=2,
                                          lam=lam, scaling="per_example")
    x_adv = l2_gradient_step(model, x, y, eps=eps, clip=False)  # no BN: eval = train mode
    l_adv = F.cross_entropy(model(x_adv), y, reduction="none")
    q = (l_adv - F.cross_entropy(model(x), y, reduction="none")) / eps
    torch.testing.assert_close(loss, l_adv.mean() + lam * q.max())
    torch.testing.assert_close(logs["grad_norm_max"], q.max())


def count_forwards(cfg) -> int:
    module, datamodule, _ = build_run(cfg)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    calls = []
    module.net.register_forward_pre_hook(lambda *_: calls.append(1))
    module.train()
    module.training_step((x.float(), y), 0)
    return len(calls)


@pytest.mark.parametrize("reuse,passes", [(True, 2), (False, 3)])
def test_j2_fd_forward_passes(make_cfg, reuse, passes):
    cfg = make_cfg("adv=j2", "lip=lip2", "lip.method=fd", f"lip.reuse_adv_gradient={reuse}",
                   "model.width=4")
    assert count_forwards(cfg) == passes


def test_fd_objective_under_reuse_is_built_and_trains(make_cfg):
    cfg = make_cfg("adv=j1", "lip=lip1", "lip.method=fd", "lip.reuse_adv_gradient=true",
                   "adv.clip=false", "trainer.fast_dev_run=true", "logger=none",
                   "model.width=4")
    module, datamodule, trainer = build_run(cfg)
    assert module.objective.func is adversarial_fd_objective
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("overrides,match", [
    (["lip.h=0"], "lip.h"),
    (["lip.h=-0.01"], "lip.h"),
    (["lip.reuse_adv_gradient=true"], "needs lip.method=fd"),
    (["lip.dual_norm=3", "lip.method=fd"], "dual_norm"),
])
def test_bad_fd_settings_are_refused_by_the_schema(make_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(make_cfg(*overrides))


@pytest.mark.parametrize("overrides,match", [
    (["adv=j0"], "adv=j2 with lip.dual_norm=2"),
    (["adv=j1"], "adv=j2 with lip.dual_norm=2"),
    (["adv.eps=0.02"], "lip.h must equal adv.eps"),
])
def test_reuse_that_cannot_share_is_refused_before_training(make_cfg, overrides, match):
    from lipexp.build import build_module

    cfg = make_cfg("lip.method=fd", "lip.reuse_adv_gradient=true", *overrides)
    with pytest.raises(ValueError, match=match):
        build_module(cfg)


def test_share_keeps_the_penalty_settings():
    objective = partial(penalized_cross_entropy, dual_norm=2, lam=0.7, scaling="per_example",
                        target=0.1, squared=True, method="fd", h=0.03, reuse_adv_gradient=True)
    perturb, fused = share_adversarial_passes(partial(l2_gradient_step, eps=0.03, clip=False),
                                              objective)
    assert fused.keywords == dict(eps=0.03, clip=False, dual_norm=2, lam=0.7,
                                  scaling="per_example", target=0.1, squared=True)
    x, y = batch()
    assert perturb(None, x, y) is x


def test_with_clipping_the_reused_quotient_divides_by_the_step_taken():
    """Near the box's faces the J2 step is cut short by clipping; the quotient divides by its
    actual length ||x_adv - x||_2, not by eps."""
    model, (x, y) = smooth_model(), batch()
    x = x.clone()
    x[:, :, 0] = 1.0  # one row of pixels on the face x = 1 of the box
    eps = 0.3
    _, logs = adversarial_fd_objective(model, x, y, eps=eps, clip=True, dual_norm=2, lam=1.0,
                                       scaling="per_example")
    x_adv = l2_gradient_step(model, x, y, eps=eps, clip=True)
    steps = (x_adv - x).flatten(1).norm(dim=1)
    assert (steps < eps - 1e-6).any()  # the test is about clipped steps
    q = (F.cross_entropy(model(x_adv), y, reduction="none")
         - F.cross_entropy(model(x), y, reduction="none")) / steps
    torch.testing.assert_close(logs["grad_norm_max"], q.max())


@pytest.mark.parametrize("reuse", [False, True])
def test_batch_norm_counts_one_batch_per_step_as_with_the_exact_penalty(reuse):
    """The fd estimate's extra forward pass (plain fd: at x + h d; shared: the clean one)
    normalizes with its batch's statistics but leaves the running statistics alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(),
                          nn.Flatten(), nn.Linear(4 * H * W, K)).double().train()
    x, y = batch()
    if reuse:
        adversarial_fd_objective(model, x, y, eps=0.05, clip=False, dual_norm=2, lam=0.1,
                                 scaling="per_example")
    else:
        fd_grad_norms(model, x, y, dual_norm=2, h=0.05)
        fresh = nn.BatchNorm2d(4).double().train()  # one update, with the batch at x
        with torch.no_grad():
            fresh(model[0](x))
        torch.testing.assert_close(model[1].running_mean, fresh.running_mean)
        torch.testing.assert_close(model[1].running_var, fresh.running_var)
    assert int(model[1].num_batches_tracked) == 1


def test_lip1_with_clipping_divides_by_the_step_in_its_own_units():
    """J1's step is eps sign(g) / sqrt(n); clipped, its length in those units is
    sqrt(n) ||s||_inf, so the quotient sqrt(n) (l(x_adv) - l(x)) / (sqrt(n) ||s||_inf) stays
    at most ||g||_1 (Hoelder), and equals the /eps quotient where nothing is clipped."""
    from lipexp.defences.adversarial import signed_gradient_step

    model, (x, y) = smooth_model(), batch()
    x = x.clone()
    x[:, :, 0] = 1.0
    eps = 0.3
    for clip in (False, True):
        _, logs = adversarial_fd_objective(model, x, y, eps=eps, clip=clip, dual_norm=1,
                                           lam=1.0, scaling="per_example")
        x_adv = signed_gradient_step(model, x, y, eps=eps, clip=clip)
        s = (x_adv - x).flatten(1)
        delta = (F.cross_entropy(model(x_adv), y, reduction="none")
                 - F.cross_entropy(model(x), y, reduction="none"))
        q = delta / s.abs().amax(dim=1)  # = sqrt(n) delta / (sqrt(n) ||s||_inf)
        torch.testing.assert_close(logs["grad_norm_max"], q.max())
        if not clip:  # the unclipped step is eps long in these units
            torch.testing.assert_close(logs["grad_norm_max"], (delta / eps * math.sqrt(N)).max())
