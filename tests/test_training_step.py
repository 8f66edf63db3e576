"""One training step of every defence, without DDP or a Trainer, on ``device``, in float32
and under bf16 autocast (as Lightning's bf16-mixed runs the step): the loss and the logged
numbers against docs/method.md's formulas computed by hand in float64, and the step itself
(float32 loss, parameter gradient, every parameter updated, batch norm counting one batch).

Defences: adv in {j0, j1, j2} x lip in {none, lip1, lip2, lip1 fd, lip2 fd}, the 15 of the
config groups (conf/adv, conf/lip with lip.method=exact|fd), plus fd's other settings
with J1/J2: ``lip.direction=point`` (4) and ``lip.reuse_adv_gradient=true`` (j1-lip1,
j2-lip2)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipexp.data.sources import digits
from lipexp.runs.build import build_module

from .helpers import lip_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
DEFENCES = [(adv, lip) for adv in ("j0", "j1", "j2")
            for lip in ("none", "lip1", "lip2", "lip1-fd", "lip2-fd")]
DEFENCES += [(adv, f"{lip}-fd-point") for adv in ("j1", "j2") for lip in ("lip1", "lip2")]
DEFENCES += [("j1", "lip1-fd-reuse"), ("j2", "lip2-fd-reuse")]
B = 16  # the batch: the first 16 training digits (1 x 8 x 8)

# Relative tolerances against the float64 hand computation: "loss" for the loss and its
# cross-entropy, "exact" / "fd" for the penalty and the norms (and "exact" for the parameter
# gradient). float32 (on CPU all pass at a tenth of these): the loss to ~1e-7, the exact norms
# (a backward pass) to ~1e-6; the fd quotient (l(x + h d) - l(x)) / h keeps only the digits
# of l that the difference does not cancel, ~|l| 2^-24 / (h N) ~ 5e-5 here. On CUDA (TF32
# off) float32 is given 10x more: cuDNN may choose Winograd- or FFT-based algorithms, which
# round less tightly than oneDNN's direct convolutions. bf16 autocast (8-bit mantissa, 2^-9
# ~ 0.2% relative per rounding; convolutions and matmuls in bf16, the cross-entropy and fd's
# passes in float32): ~0.15% on the loss, up to ~3% on a norm (the exact norm is a bf16
# double backward; J1/J2's step and fd's direction come from a bf16 gradient, whose small
# components can change sign): a margin of 3x or more.
TOLERANCE = {
    "32-true": {"loss": 1e-5, "exact": 1e-5, "fd": 1e-3},
    "bf16-mixed": {"loss": 1e-2, "exact": 1e-1, "fd": 1e-1},
}
CUDA_FLOAT32_FACTOR = 10


def first_batch(device):
    arrays = digits("unused", False)
    return arrays.train_x[:B].to(device), arrays.train_y[:B].to(device)


def fixed_statistics(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``net`` in eval mode whose batch norm layers normalize with the batch
    statistics of ``x`` (mean and biased variance per channel), so that each image's loss
    is its own: fd's per-example loss ``l_i`` (docs/method.md)."""
    ref = copy.deepcopy(net).train()
    norms = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.setdefault(m, args[0]))
             for m in norms]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    for m in norms:
        z = seen[m].transpose(0, 1).flatten(1)  # (C, values per channel)
        m.running_mean.copy_(z.mean(1))
        m.running_var.copy_(z.var(1, unbiased=False))
    return ref.eval()


def losses_of(net, x, y):
    return F.cross_entropy(net(x), y, reduction="none")


def input_gradient(net, x, y, create_graph=False):
    """``(l(x), grad_x sum_i l(x_i))``: each image its own gradient (up to batch norm's
    coupling in train mode)."""
    x = x.detach().requires_grad_(True)
    losses = losses_of(net, x, y)
    (g,) = torch.autograd.grad(losses.sum(), x, create_graph=create_graph)
    return losses, g


def unit(g, dual_norm, step=False):
    """``g / ||g||_2`` or ``sign(g) / sqrt(n)``. For a ``step`` (J1's) the sign is taken only
    where rounding cannot decide it: no nonzero component below 1e-4 of its image's largest
    (float32's gradient is within ~1e-6 of it), as a flipped pixel would move the point by
    2 eps / sqrt(n). (In fd's Lip1 direction such a flip changes the quotient by 2 |g_j|, below
    its tolerance.)"""
    if dual_norm == 2:
        return g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    small = (g != 0) & (g.abs() < 1e-4 * g.flatten(1).abs().amax(1).view(-1, 1, 1, 1))
    assert not (step and small.any()), "a gradient component too small for a certain sign"
    return g.sign() / math.sqrt(g[0].numel())


def by_hand(cfg, net: nn.Module, x, y):
    """``(loss, logs, net64)``: the training step's loss and logs by docs/method.md's
    formulas, in float64 on ``net64``, a copy of ``net`` in train mode taken before the step."""
    net = copy.deepcopy(net).double().train()
    x = x.double()
    n = x[0].numel()
    lip, attack = cfg.lip, cfg.adv.get("eps") is not None
    attack_norm = 1 if "signed" in cfg.adv._target_ else 2  # J1: sign(g); J2: g / ||g||
    if lip.get("reuse_adv_gradient"):  # J1/J2 and fd share passes: train-mode g at x
        p = lip.dual_norm
        losses, g = input_gradient(net, x, y)
        x_adv = (x + cfg.adv.eps * unit(g, p, step=True)).clamp(0, 1)
        s = x_adv - x  # the step taken (clipped), in d's units: l2, or sqrt(n) l-infinity
        lengths = s.flatten(1).norm(dim=1) if p == 2 else s.flatten(1).abs().amax(1) * n**0.5
        losses_adv = losses_of(net, x_adv, y)
        norms = (losses_adv - losses) / lengths * (n**0.5 if p == 1 else 1)
        return penalized(lip, losses_adv, norms, n), net
    g0 = None
    if attack:  # J1/J2: one step from the eval-mode gradient at the clean image, clipped
        _, g0 = input_gradient(copy.deepcopy(net).eval(), x, y)
        x = (x + cfg.adv.eps * unit(g0, attack_norm, step=True)).clamp(0, 1)
    if "dual_norm" not in lip:
        ce = losses_of(net, x, y).mean()
        return (ce, {"loss": ce, "ce": ce}), net
    p = lip.dual_norm
    if lip.method == "exact":  # double backpropagation, batch norm in train mode
        losses, g = input_gradient(net, x, y, create_graph=True)
        norms = torch.linalg.vector_norm(g.flatten(1), ord=p, dim=1)
    else:  # fd: (l_i(x + h d) - l_i(x)) / h, the batch statistics of x held fixed
        ref = fixed_statistics(net, x)
        losses = losses_of(ref, x, y)
        along_attack = attack and lip.direction == "attack"
        g = g0 if along_attack else input_gradient(ref, x, y)[1]  # the attack's, or l_i's
        norms = (losses_of(ref, x + lip.h * unit(g, p), y) - losses) / lip.h
        norms = norms * n**0.5 if p == 1 else norms
    return penalized(lip, losses, norms, n), net


def penalized(lip, losses, norms, n):
    """``(J, logs)``: ``J = mean l + w max_i N_i / B``, ``w = lam`` (Lip2) or ``lam / sqrt(n)``
    (Lip1), the default ``scaling=batch_mean``."""
    weight = lip.lam / math.sqrt(n) if lip.lam_over_sqrt_n else lip.lam
    penalty = weight * norms.max() / len(norms)
    ce = losses.mean()
    return ce + penalty, {"loss": ce + penalty, "ce": ce, "penalty": penalty,
                          "grad_norm_max": norms.max(), "grad_norm_mean": norms.mean()}


@pytest.mark.numerics
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("adv,lip", DEFENCES, ids=["-".join(d) for d in DEFENCES])
def test_a_training_step_of_every_defence(make_cfg, device, adv, lip, precision):
    """The step's logs are the hand computation's (TOLERANCE), its loss a float32 tensor
    equal to the logged one; in float32 without fd its parameter gradient is the hand loss's
    (fd's differentiates batch statistics that the hand computation holds as constants);
    the optimizer moves every parameter; each batch norm counts one batch."""
    cfg = make_cfg(f"adv={adv}", *lip_overrides(lip), "model.width=4", "logger=none")
    torch.manual_seed(0)
    module = build_module(cfg).to(device)
    module.train()
    x, y = first_batch(device)
    (expected, expected_logs), net64 = by_hand(cfg, module.net, x, y)
    before = [p.detach().clone() for p in module.parameters()]
    logged = {}
    module.log = lambda name, value, **kw: logged.setdefault(name, value)
    optimizer = module.configure_optimizers()["optimizer"]
    optimizer.zero_grad()
    bf16 = precision == "bf16-mixed"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = module.training_step((x, y), 0)
    module.backward(loss)  # fd: without TF32 on CUDA

    with_penalty = {"penalty", "grad_norm_max", "grad_norm_mean"} if lip != "none" else set()
    assert set(logged) == {f"train/{k}" for k in {"loss", "ce", "acc"} | with_penalty}
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert logged["train/loss"] == loss.detach() and 0 <= logged["train/acc"] <= 1
    tol = dict(TOLERANCE[precision])
    if device.type == "cuda" and not bf16:
        tol = {k: v * CUDA_FLOAT32_FACTOR for k, v in tol.items()}
    method = "fd" if "-fd" in lip else "exact"
    for key, value in expected_logs.items():
        rtol = tol["loss"] if key in ("loss", "ce") else tol[method]
        torch.testing.assert_close(logged[f"train/{key}"].double().cpu(), value.detach().cpu(),
                                   rtol=rtol, atol=0, msg=key)
    if lip != "none":
        assert logged["train/grad_norm_max"] >= logged["train/grad_norm_mean"] > 0
    if not bf16 and method == "exact":
        expected.backward()
        # atol on the gradient's scale: fc.bias's is 0 up to rounding (the tanh head's batch
        # norm subtracts the logits' mean)
        scale = max(p.grad.abs().max().item() for p in net64.parameters())
        for (name, p), p64 in zip(module.net.named_parameters(), net64.parameters()):
            torch.testing.assert_close(p.grad.double().cpu(), p64.grad.cpu(), rtol=tol["exact"],
                                       atol=tol["exact"] * scale, msg=name)
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    counts = [m.num_batches_tracked.item() for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert counts and set(counts) == {1}
