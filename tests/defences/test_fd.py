"""The finite-difference penalty (lip.method=fd): against the hand formula, against the exact
norm on a smooth model, its parameter gradient, its forward passes, and its settings."""

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lipexp.defences.fd as fdm
from lipexp.config.schema import validate
from lipexp.defences.adversarial import l2_gradient_step, no_perturbation, signed_gradient_step
from lipexp.defences.batch_stats import with_batch_statistics
from lipexp.defences.compose import adversarial_fd_objective, compose
from lipexp.defences.fd import fd_grad_norms
from lipexp.defences.penalty import exact_grad_norms, penalized, penalized_cross_entropy

from ..helpers import DEFENCE_K, DEFENCE_SHAPE, build_run, lip_config_of
from ..helpers import defence_batch as batch

pytestmark = pytest.mark.usefixtures("one_thread")
(C, H, W), K = DEFENCE_SHAPE, DEFENCE_K  # tiny images: channels, height, width; classes
N = C * H * W


def smooth_model(dtype=torch.float64) -> nn.Module:
    """Softplus everywhere: no kinks, so the finite difference is O(h) accurate."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.Softplus(), nn.Flatten(),
                         nn.Linear(4 * H * W, 8), nn.Softplus(), nn.Linear(8, K)).to(dtype)


def random_direction(shape, device) -> torch.Tensor:
    """A unit l2 direction per image from the global generator, drawn on the CPU (the same on
    every device)."""
    return fdm.unit_direction(torch.randn(shape, dtype=torch.float64).to(device), 2)


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


# Float64 throughout this file: the default tolerances of assert_close (rtol 1e-7) hold
# whatever the kernels; the quotient's rounding is ~1e-16 / h, far below them.


@pytest.mark.numerics
@pytest.mark.parametrize("dual_norm", [1, 2])
def test_fd_equals_the_hand_formula(dual_norm, device):
    model, (x, y) = smooth_model().to(device), batch(device=device)
    est = fd_grad_norms(model, x, y, dual_norm, h=0.05)
    torch.testing.assert_close(est.norms, hand_fd(model, x, y, dual_norm, 0.05))
    torch.testing.assert_close(est.losses, F.cross_entropy(model(x), y, reduction="none"))


@pytest.mark.numerics
@pytest.mark.parametrize("dual_norm", [1, 2])
def test_fd_converges_to_the_exact_norm(dual_norm, device):
    """O(h) towards the exact norm; at h = 1e-3 float64 rounding (~1e-16 / h) is ~1e-10 of
    the error measured, so the ordering of the errors is the truncation error's."""
    model, (x, y) = smooth_model().to(device), batch(b=16, device=device)
    exact = exact_grad_norms(model, x, y, dual_norm).norms.detach()
    errors = [((fd_grad_norms(model, x, y, dual_norm, h).norms.detach() - exact).abs()
               / exact).max().item() for h in (0.3, 0.1, 0.01, 0.001)]
    assert errors[2] < 0.02  # within 2% at the default h = 0.01
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 50  # O(h)


@pytest.mark.numerics
@pytest.mark.parametrize("dual_norm", [1, 2])
def test_fd_penalty_gradient_flows_through_both_losses(dual_norm, monkeypatch, device):
    """gradcheck with d held fixed (it is detached by definition): the analytic gradient
    must include both l(x + h d) and l(x); dropping either fails."""
    model, (x, y) = smooth_model().to(device), batch(b=4, device=device)
    names = [n for n, _ in model.named_parameters()]
    d0 = fdm.unit_direction(torch.randn(4, C, H, W, dtype=torch.float64).to(device), dual_norm)
    monkeypatch.setattr(fdm, "unit_direction", lambda g, norm: d0)

    def objective(*params):
        net = lambda inp: functional_call(model, dict(zip(names, params)), (inp,))  # noqa: E731
        return penalized_cross_entropy(net, x, y, dual_norm=dual_norm, lam=0.5,
                                       scaling="per_example", method="fd", h=0.1)[0]

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    # CUDA: cuDNN's float64 convolution backward may sum with atomics, so two analytic
    # passes can differ by rounding (~1e-16 relative); gradcheck's reentrancy check then
    # needs a tolerance, far below atol. The CPU's kernels repeat bit for bit.
    nondet_tol = 0.0 if device.type == "cpu" else 1e-12
    assert torch.autograd.gradcheck(objective, params, eps=1e-6, atol=1e-5,
                                    nondet_tol=nondet_tol)


@pytest.mark.numerics
def test_reused_objective_equals_its_formula(device):
    """J = mean l(x_adv) + lam * max_i (l(x_adv_i) - l(x_i)) / eps, x_adv the J2 image."""
    model, (x, y) = smooth_model().to(device), batch(device=device)
    eps, lam = 0.05, 0.3
    loss, logs = adversarial_fd_objective(model, x, y, eps=eps, clip=False, dual_norm=2,
                                          lam=lam, scaling="per_example")
    x_adv = l2_gradient_step(model, x, y, eps=eps, clip=False)  # no BN: eval = train mode
    l_adv = F.cross_entropy(model(x_adv), y, reduction="none")
    q = (l_adv - F.cross_entropy(model(x), y, reduction="none")) / eps
    torch.testing.assert_close(loss, l_adv.mean() + lam * q.max())
    torch.testing.assert_close(logs["grad_norm_max"], q.max())


def count_passes(cfg, monkeypatch) -> tuple[list[tuple[int, bool]], int]:
    """(images, with a graph) of each forward pass of the network in one training step, and
    the number of backward passes to the input (autograd.grad calls) it makes."""
    module, datamodule, _ = build_run(cfg)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    calls, grads = [], []
    module.net.register_forward_pre_hook(
        lambda _, args: calls.append((len(args[0]), torch.is_grad_enabled())))
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or grad(*a, **k))
    module.train()
    module.training_step((x.float(), y), 0)
    assert all(b in (1, len(y)) for b, _ in calls), calls  # the batch, or one image
    return [(b if b == 1 else "B", grad) for b, grad in calls], len(grads)


@pytest.mark.parametrize("overrides,passes,to_input", [
    # J2's gradient (its backward pass is the only one to the input), the cross-entropy's
    # pass at x_adv, the pass at x_adv + h d without a graph, its arg-max image with one
    ([], ["B", "B", "B no graph", "1"], 1),
    # + x_adv again (statistics fixed) for its own gradient: a backward pass to the input
    (["lip.direction=point"], ["B", "B", "B", "B no graph", "1"], 2),
    (["lip.reuse_adv_gradient=true"], ["B", "B"], 1),  # shared passes (h = adv.eps = 0.01)
])
def test_j2_fd_passes(make_cfg, monkeypatch, overrides, passes, to_input):
    cfg = make_cfg("adv=j2", "lip=lip2", "lip.method=fd", "model.width=4", *overrides)
    names = {(1, True): "1", ("B", True): "B", ("B", False): "B no graph"}
    forwards, backwards_to_input = count_passes(cfg, monkeypatch)
    assert [names[call] for call in forwards] == passes
    assert backwards_to_input == to_input


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
    (["lip.dual_norm=3", "lip.method=fd"], "dual_norm"),
])
def test_bad_fd_settings_are_refused_by_the_schema(make_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(make_cfg(*overrides))


def test_an_unknown_fd_direction_is_refused_when_the_config_is_composed(make_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as error:
        make_cfg("lip.method=fd", "lip.direction=sideways")
    assert "expected one of [attack, point]" in str(error.value.__cause__)


@pytest.mark.parametrize("overrides,match", [
    (["adv=j0"], "adv=j2 with lip.dual_norm=2"),
    (["adv=j1"], "adv=j2 with lip.dual_norm=2"),
    (["adv.eps=0.02"], "lip.h must equal adv.eps"),
    (["lip.method=exact"], "needs lip.method=fd"),
    (["lip.direction=point"], "cannot be combined with lip.direction=point"),
    (["trainer.precision=bf16-true"], "needs float32 weights"),
])
def test_reuse_that_cannot_share_is_refused_before_training(make_cfg, overrides, match):
    """lipexp.defences.compose.check_fd, when the module is built (before any data)."""
    from lipexp.runs.build import build_module

    cfg = make_cfg("lip.method=fd", "lip.reuse_adv_gradient=true", *overrides)
    with pytest.raises(ValueError, match=match):
        build_module(cfg)


def test_share_keeps_the_penalty_settings():
    objective = partial(penalized_cross_entropy, dual_norm=2, lam=0.7, scaling="per_example",
                        target=0.1, squared=True, method="fd", h=0.03, reuse_adv_gradient=True)
    perturb, fused = compose(partial(l2_gradient_step, eps=0.03, clip=False), objective,
                             lip_config_of(objective))
    assert fused.keywords == dict(eps=0.03, clip=False, dual_norm=2, lam=0.7, lam_over_sqrt_n=False,
                                  scaling="per_example", target=0.1, squared=True)
    x, y = batch()
    assert perturb(None, x, y) is x


@pytest.mark.numerics
def test_with_clipping_the_reused_quotient_divides_by_the_step_taken(device):
    """Near the box's faces the J2 step is cut short by clipping; the quotient divides by its
    actual length ||x_adv - x||_2, not by eps."""
    model, (x, y) = smooth_model().to(device), batch(device=device)
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


@pytest.mark.parametrize("reuse,momentum", [(False, 0.1), (False, None), (True, 0.1)])
def test_batch_norm_counts_one_batch_per_step_as_with_the_exact_penalty(reuse, momentum,
                                                                          device):
    """The fd estimate's passes update batch norm's running statistics once, with the batch
    at the point, as the layer's own forward does (momentum None: cumulative average);
    the pass at x + h d (shared: the clean one) leaves them alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum),
                          nn.Softplus(), nn.Flatten(), nn.Linear(4 * H * W, K)).double().train()
    model.to(device)
    x, y = batch(device=device)
    fresh = copy.deepcopy(model[1])
    for step in range(2):
        if reuse:
            adversarial_fd_objective(model, x, y, eps=0.05, clip=False, dual_norm=2, lam=0.1,
                                     scaling="per_example")
        else:
            fd_grad_norms(model, x + step, y, dual_norm=2, h=0.05)
            with torch.no_grad():  # the layer's own forward: one update, the batch at x
                fresh(model[0](x + step))
            torch.testing.assert_close(model[1].running_mean, fresh.running_mean)
            torch.testing.assert_close(model[1].running_var, fresh.running_var)
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.numerics
def test_lip1_with_clipping_divides_by_the_step_in_its_own_units(device):
    """J1's step is eps sign(g) / sqrt(n); clipped, its length in those units is
    sqrt(n) ||s||_inf, so the quotient sqrt(n) (l(x_adv) - l(x)) / (sqrt(n) ||s||_inf) stays
    at most ||g||_1 (Hoelder), and equals the /eps quotient where nothing is clipped."""
    model, (x, y) = smooth_model().to(device), batch(device=device)
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


def bn_model() -> nn.Module:
    """Batch norm after the convolution (affine) and on the logits (not affine, as the tanh
    head's), in train mode: examples are coupled through the batch statistics."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(),
                         nn.Flatten(), nn.Linear(4 * H * W, K),
                         nn.BatchNorm1d(K, affine=False)).double().train()


@pytest.mark.numerics
def test_fd_holds_the_batch_statistics_fixed(device):
    """N_i = (l_i(x_i + h d_i) - l_i(x_i)) / h with every batch norm layer normalizing with the
    statistics of the batch at x: a per-example function (PyTorch's batch norm in eval mode
    with those statistics as running statistics is the reference)."""
    model, (x, y) = bn_model().to(device), batch(device=device)
    d = random_direction(x.shape, device)
    h = 0.05
    ref = with_batch_statistics(model, x)
    losses = F.cross_entropy(copy.deepcopy(model)(x), y, reduction="none")  # train mode
    est = fd_grad_norms(model, x, y, 2, h=h, direction=d)
    torch.testing.assert_close(est.losses, losses)
    expected = (F.cross_entropy(ref(x + h * d), y, reduction="none")
                - F.cross_entropy(ref(x), y, reduction="none")) / h
    torch.testing.assert_close(est.norms, expected)
    # the copy differs from the model (running statistics in train mode) if BN were ignored
    assert not torch.allclose(expected, fd_grad_norms(model.eval(), x, y, 2, h=h,
                                                      direction=d).norms)


@pytest.mark.numerics
def test_fd_leaves_frozen_batch_norm_layers_alone(device):
    """A layer in eval mode with running statistics (frozen) normalizes with them in every
    pass; one without running statistics (track_running_stats=False) uses the batch's even
    in eval mode, so its statistics are held fixed like a train-mode layer's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(),
                          nn.Flatten(), nn.Linear(4 * H * W, K),
                          nn.BatchNorm1d(K, affine=False, track_running_stats=False)).double()
    with torch.no_grad():  # the frozen layer's running statistics: not the batch's
        model[4].running_mean.uniform_(-1, 1)
        model[4].running_var.uniform_(0.5, 2)
    model.train()
    model[4].eval()
    model[8].eval()
    model.to(device)
    x, y = batch(device=device)
    d = random_direction(x.shape, device)
    frozen = (model[4].running_mean.clone(), model[4].running_var.clone())
    ref = with_batch_statistics(model, x)
    assert not ref[4].training and torch.equal(ref[4].running_mean, frozen[0])  # untouched
    expected = (F.cross_entropy(ref(x + 0.05 * d), y, reduction="none")
                - F.cross_entropy(ref(x), y, reduction="none")) / 0.05
    est = fd_grad_norms(model, x, y, 2, h=0.05, direction=d)
    torch.testing.assert_close(est.norms, expected)
    assert torch.equal(model[4].running_mean, frozen[0])  # the frozen layer is not updated
    assert model[8].running_mean is None and "forward" not in model[8].__dict__


@pytest.mark.numerics
def test_fd_at_the_point_follows_each_image_s_own_gradient_with_batch_norm(device):
    """Without a direction, d is the gradient of l_i at x_i with the batch statistics fixed
    (not that of the summed loss through train-mode batch norm, whose cross-terms turn it
    away), so the estimate converges to ||grad l_i(x_i)||_2, statistics fixed, as h -> 0.
    At h = 1e-4 float64 rounding adds ~1e-16 / h = 1e-12, far below the 1e-3 asserted."""
    model, (x, y) = bn_model().to(device), batch(b=16, device=device)
    ref = with_batch_statistics(model, x)
    exact = exact_grad_norms(ref, x, y, 2).norms.detach()
    coupled = exact_grad_norms(copy.deepcopy(model), x, y, 2).norms.detach()
    assert (coupled / exact - 1).abs().max() > 0.05  # the two gradients differ here
    errors = [((fd_grad_norms(model, x, y, 2, h=h).norms.detach() - exact).abs()
               / exact).max().item() for h in (1e-2, 1e-4)]
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 50  # O(h) towards the exact norm


def hand_penalty(model, x, y, d, h, lam, duplicate=None):
    """J = mean l(x) + lam max_i (l_i(x_i + h d_i) - l_i(x_i)) / h written out for
    ``bn_model`` with every image given a graph and both layers' batch statistics (those of
    the batch at x) differentiable, in float64; returns (J, parameters)."""
    conv, bn, lin, bn_logits = model[0], model[1], model[4], model[5]
    params = [conv.weight, conv.bias, bn.weight, bn.bias, lin.weight, lin.bias]

    def batch_norm(z, mean, var, eps, dims):
        shape = (1, -1, *[1] * (z.dim() - 2))
        return (z - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)

    z0 = F.conv2d(x, conv.weight, conv.bias, padding=1)
    var, mean = torch.var_mean(z0, dim=(0, 2, 3), correction=0)  # the batch at x
    a0 = F.softplus(batch_norm(z0, mean, var, bn.eps, None) * bn.weight.view(1, -1, 1, 1)
                    + bn.bias.view(1, -1, 1, 1))
    logits0 = F.linear(a0.flatten(1), lin.weight, lin.bias)
    var_l, mean_l = torch.var_mean(logits0, dim=0, correction=0)

    def losses(inp):
        z = F.conv2d(inp, conv.weight, conv.bias, padding=1)
        a = F.softplus(batch_norm(z, mean, var, bn.eps, None) * bn.weight.view(1, -1, 1, 1)
                       + bn.bias.view(1, -1, 1, 1))
        logits = batch_norm(F.linear(a.flatten(1), lin.weight, lin.bias), mean_l, var_l,
                            bn_logits.eps, None)
        return F.cross_entropy(logits, y, reduction="none")

    l0 = losses(x)
    return l0.mean() + lam * ((losses(x + h * d) - l0) / h).max(), params


@pytest.mark.numerics
def test_fd_penalty_gradient_is_exact_with_batch_norm(device):
    """The parameters' gradient of J = mean l(x) + lam max_i N_i (only the arg-max image gets
    a graph at x + h d) equals that of the same J written out by hand, every image with a
    graph and the batch statistics (of a convolution's and of the logits' batch norm)
    differentiable (float64)."""
    model, (x, y) = bn_model().to(device), batch(device=device)
    d = random_direction(x.shape, device)
    h, lam = 0.05, 0.7
    expected_loss, params = hand_penalty(model, x, y, d, h, lam)
    expected = torch.autograd.grad(expected_loss, params)
    loss, _ = penalized(fd_grad_norms(model, x, y, 2, h=h, direction=d), y, n=N, dual_norm=2,
                        lam=lam, scaling="per_example")
    got = torch.autograd.grad(loss, params)
    # The two sides sum the same terms in other orders (batch norm's kernel against the
    # formula): float64 rounding ~1e-16, times ~1 / h = 20 for the quotient's cancellation,
    # so rtol 1e-9 is kernel-proof yet fails for any missing term (O(1) relative). atol for
    # the biases before batch norm, whose gradient is 0 up to that rounding.
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss, expected_loss)


def dyadic(g: torch.Generator, shape, lo: int, hi: int, denominator: int) -> torch.Tensor:
    """Integers in [lo, hi] over ``denominator`` (a power of 2), float64: few bits each."""
    return torch.randint(lo, hi + 1, shape, generator=g).double() / denominator


@pytest.mark.numerics
def test_fd_penalty_gradient_with_a_tie_at_the_max(device):
    """Two copies of the image with the largest estimate tie exactly at the max: the penalty
    still gets that image's gradient (max splits it between the copies, each carrying it),
    not zero and not half of it. The reference is the penalty written out with a graph for
    every image (float64).

    The tie must be exact in the batch pass on any kernel set: which micro-kernel computes
    a row of a matmul (and so its rounding) depends on the ISA and on the row's position,
    and a linear + batch norm + softplus model's copies came apart by an ulp under MKL's
    compatible code path (MKL_CBWR=COMPATIBLE) and on AVX-512 Intel CPUs. So inputs,
    direction, step and weights are dyadic with few bits: every product and partial sum of
    both matmuls (at most ~21 significant bits) is exact in float64 in any order, ReLU is
    exact, and the batch norm on the logits and the cross-entropy treat each row alike;
    the copies' estimates are then bit-identical wherever this runs."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(N, 8), nn.ReLU(), nn.Linear(8, K),
                          nn.BatchNorm1d(K, affine=False)).double().train()
    lin1, lin2 = model[1], model[3]
    with torch.no_grad():
        for lin in (lin1, lin2):
            lin.weight.copy_(dyadic(g, lin.weight.shape, -8, 8, 8))
            lin.bias.copy_(dyadic(g, lin.bias.shape, -8, 8, 8))
    x = dyadic(g, (6, C, H, W), 4, 12, 16)  # in [0.25, 0.75]
    y = torch.randint(0, K, (6,), generator=g)
    d = dyadic(g, (6, C, H, W), -4, 4, 8)  # a direction (not of unit length: no rounding)
    h, lam = 1 / 16, 0.7  # x + h d exact too
    model, x, y, d = model.to(device), x.to(device), y.to(device), d.to(device)
    with torch.no_grad():
        top = fd_grad_norms(copy.deepcopy(model), x, y, 2, h=h, direction=d).norms.argmax()
    x, y, d = (torch.cat([t, t[top:top + 1]]) for t in (x, y, d))  # a 7th image: a copy
    params = [lin1.weight, lin1.bias, lin2.weight, lin2.bias]
    bn = model[4]

    def logits_of(inp):
        return F.linear(F.relu(F.linear(inp.flatten(1), lin1.weight, lin1.bias)),
                        lin2.weight, lin2.bias)

    var, mean = torch.var_mean(logits_of(x), dim=0, correction=0)  # the batch at x

    def losses(inp):
        return F.cross_entropy((logits_of(inp) - mean) / torch.sqrt(var + bn.eps), y,
                               reduction="none")

    l0 = losses(x)
    expected = torch.autograd.grad(l0.mean() + lam * ((losses(x + h * d) - l0) / h).max(),
                                   params)
    est = fd_grad_norms(model, x, y, 2, h=h, direction=d)
    norms = est.norms.detach().cpu()
    assert (norms == norms.max()).sum() == 2 and norms[-1] == norms.max()  # the tie, exact
    # the copy keeps the max: the next estimate is far below (kernels move it by ~1e-16)
    assert norms.sort(descending=True).values[2] < 0.9 * norms.max()
    loss, _ = penalized(est, y, n=N, dual_norm=2, lam=lam, scaling="per_example")
    # rounding of the formula against the kernels: as in the previous test
    for got, e in zip(torch.autograd.grad(loss, params), expected):
        torch.testing.assert_close(got, e, rtol=1e-9, atol=1e-12)


def test_batch_statistics_put_back_a_forward_of_the_layer_s_own(device):
    model, (x, y) = bn_model().to(device), batch(device=device)
    own = model[1].forward  # a bound method
    model[1].forward = own  # as a tool that wraps forward would leave it
    fd_grad_norms(model, x, y, 2, h=0.05)
    assert model[1].__dict__["forward"] is own
    assert "forward" not in model[5].__dict__  # none before, none after


@pytest.mark.parametrize("case", ["subclass", "shared", "one_image"])
def test_batch_statistics_refuse_what_they_cannot_hold_fixed(case):
    class Custom(nn.BatchNorm2d):
        def forward(self, z):
            return super().forward(z) * 2

    model, (x, y) = bn_model(), batch()
    match = {"subclass": "Custom has a forward of its own",
             "shared": "called more than once", "one_image": "more than 1 value"}[case]
    if case == "subclass":
        model[1] = Custom(4).double()
    elif case == "shared":
        model = nn.Sequential(model[0], model[1], model[1], *model[2:])
    else:
        x, y = x[:1], y[:1]
    with pytest.raises(ValueError, match=match):
        fd_grad_norms(model, x, y, 2, h=0.05)


@pytest.mark.numerics
@pytest.mark.parametrize("perturb,dual_norm", [(l2_gradient_step, 2), (l2_gradient_step, 1),
                                               ("j1", 1), ("j1", 2)])
def test_fd_along_the_attack_direction_equals_its_formula(perturb, dual_norm, device):
    """lip.direction=attack (the default): J = mean l(x_adv) + lam max_i N_i, N_i the slope at
    x_adv along the J1/J2 gradient's direction at the clean image, g / ||g||_2 (Lip2) or
    sign(g) / sqrt(n) (Lip1); one backward pass to the input per step (the attack's)."""
    perturb = signed_gradient_step if perturb == "j1" else perturb
    model, (x, y) = smooth_model().to(device), batch(device=device)
    eps, h, lam = 0.2, 0.05, 0.3
    fd = partial(penalized_cross_entropy, dual_norm=dual_norm, lam=lam, scaling="per_example",
                 method="fd", h=h)
    step, objective = compose(partial(perturb, eps=eps, clip=False), fd, lip_config_of(fd))
    assert step(model, x, y) is x  # the objective makes the step
    loss, logs = objective(model, x, y)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    d = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if dual_norm == 2 else g.sign() / N ** .5
    x_adv = perturb(model, x, y, eps=eps, clip=False)
    l_adv = F.cross_entropy(model(x_adv), y, reduction="none")
    q = (F.cross_entropy(model(x_adv + h * d), y, reduction="none") - l_adv) / h
    q = q * N ** .5 if dual_norm == 1 else q
    torch.testing.assert_close(loss, l_adv.mean() + lam * q.max())
    torch.testing.assert_close(logs["grad_norm_max"], q.max())


def test_compose_leaves_what_does_not_use_the_attack_alone():
    j2 = partial(l2_gradient_step, eps=0.1)
    for perturb, objective in [
            (j2, partial(penalized_cross_entropy, dual_norm=2, lam=0.1)),  # exact
            (j2, partial(penalized_cross_entropy, dual_norm=2, lam=0.1, method="fd",
                         direction="point")),
            (no_perturbation, partial(penalized_cross_entropy, dual_norm=2, lam=0.1,
                                      method="fd"))]:  # J0: no attack gradient
        assert compose(perturb, objective, lip_config_of(objective)) == (perturb, objective)


def test_fd_backward_runs_without_tf32(make_cfg, monkeypatch):
    """The fd step's backward pass runs inside tf32_off (the exact method's does not), and
    tf32_off turns TensorFloat-32 off for CUDA and puts the user's settings back."""
    from contextlib import contextmanager

    entered = []
    import lipexp.precision as precision

    real = precision.tf32_off

    @contextmanager
    def recording(device):
        entered.append(torch.device(device).type)
        with real(device):
            yield

    monkeypatch.setattr(precision, "tf32_off", recording)
    for method, expected in (("fd", ["cpu"]), ("exact", [])):
        module, datamodule, _ = build_run(make_cfg(f"lip.method={method}", "model.width=4"))
        datamodule.setup("fit")
        x, y = next(iter(datamodule.train_dataloader()))
        loss = module.train().training_step((x.float(), y), 0)
        entered.clear()
        module.backward(loss)
        assert entered == expected, method
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = True
        with real(torch.device("cuda")):  # flags only: no CUDA device needed
            assert [f.allow_tf32 for f in flags] == [False, False]
        assert [f.allow_tf32 for f in flags] == [True, True]  # the user's settings back
    finally:
        for f, value in zip(flags, before):
            f.allow_tf32 = value


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "transformer-engine"])
def test_fd_with_half_precision_weights_is_refused(make_cfg, precision):
    from lipexp.runs.build import build_module, build_trainer

    cfg = make_cfg("lip.method=fd", f"trainer.precision={precision}", "model.width=4")
    with pytest.raises(ValueError, match="needs float32 weights"):
        build_trainer(cfg, build_module(cfg), [])
