"""``lip.batch_stats`` of the exact penalty (docs/method.md, "Which gradient the penalty
sees: batch statistics live or fixed"): ``fixed`` is each image's own gradient with the
batch's statistics as constants, checked against a network written out by hand; ``live``
is today's double backpropagation of the batch's summed loss; fd converges to ``fixed`` as
h -> 0; the penalty trains through ``fixed`` (finite differences of the weights); running
statistics are updated once; fd with ``live`` is refused. float64, tiny networks, CPU."""

import copy
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException
from torch import nn

from lipexp.config.schema import BatchStats, LipConfig, Method, lip_config
from lipexp.defences.fd import fd_grad_norms
from lipexp.defences.penalty import exact_grad_norms, penalized_cross_entropy
from lipexp.models.heads import TanhHead
from lipexp.runs.build import build_module

from ..helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_net(seed: int = 0) -> nn.Module:
    """conv, BN2d (affine), softplus, linear, the tanh head (BN1d of the logits, no
    affine): batch statistics over batch and pixels, and over the batch alone."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Softplus(),
                        nn.Flatten(), nn.Linear(3 * 5 * 5, 4), TanhHead(4, t_init=0.7))
    with torch.no_grad():  # BN's affine parameters away from (1, 0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net.double().train()


def batch(b: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (b,), generator=g))


def by_hand(net: nn.Module, x: torch.Tensor, stats: dict | None = None):
    """``net(x)`` with each batch norm written out: ``(z - mean) / sqrt(var + eps) * w + b``
    with ``mean``, ``var`` (biased) computed here from the batch when ``stats`` is None
    (returned, detached), else the given constants."""
    conv, bn, act, flat, lin, head = net
    record = stats is None
    stats = {} if record else stats

    def norm(layer, z, dims):
        if record:
            stats[layer] = (z.mean(dims).detach(), z.var(dims, unbiased=False).detach())
        mean, var = stats[layer]
        shape = (1, -1, *[1] * (z.dim() - 2))
        out = (z - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps)
        return out * layer.weight.view(shape) + layer.bias.view(shape) if layer.affine else out

    z = lin(flat(act(norm(bn, conv(x), (0, 2, 3)))))
    scale = head.t.abs()
    return scale * torch.tanh(norm(head.bn, z, (0,)) / scale), stats


@pytest.mark.parametrize("dual_norm", [1, 2])
def test_exact_fixed_is_each_image_s_own_gradient_with_the_statistics_as_constants(dual_norm):
    net, (x, y) = bn_net(), batch()
    logits, stats = by_hand(net, x)
    est = exact_grad_norms(net, x, y, dual_norm, batch_stats="fixed")
    expected = []
    for i in range(len(x)):  # one image at a time: no other image can enter its gradient
        xi = x[i:i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(by_hand(net, xi, stats)[0], y[i:i + 1])
        (g,) = torch.autograd.grad(loss, xi)
        expected.append(g.flatten().norm(p=dual_norm))
    torch.testing.assert_close(est.norms, torch.stack(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(est.logits, logits, rtol=1e-10, atol=1e-12)  # the batch pass
    torch.testing.assert_close(est.losses, F.cross_entropy(logits, y, reduction="none"))
    live = exact_grad_norms(net, x, y, dual_norm).norms  # the two differ with batch norm
    assert not torch.allclose(live, est.norms, rtol=1e-2)


def test_exact_live_is_today_s_double_backpropagation_and_the_default():
    net, (x, y) = bn_net(), batch()
    x0 = x.clone().requires_grad_(True)
    losses = F.cross_entropy(net(x0), y, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), x0, create_graph=True)
    expected = g.flatten(1).norm(dim=1)
    params = list(net.parameters())
    expected_grads = torch.autograd.grad(expected.max(), params)
    for est in (exact_grad_norms(net, x, y, 2, batch_stats="live"),
                exact_grad_norms(net, x, y, 2)):
        torch.testing.assert_close(est.norms, expected, rtol=1e-12, atol=0)
        for a, b in zip(torch.autograd.grad(est.norms.max(), params), expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    kw = {"dual_norm": 2, "lam": 1.0}
    default, _ = penalized_cross_entropy(net, x, y, **kw)  # batch_stats None: exact's live
    live, _ = penalized_cross_entropy(net, x, y, batch_stats=BatchStats.live, **kw)
    fixed, _ = penalized_cross_entropy(net, x, y, batch_stats="fixed", **kw)
    assert default.item() == live.item() != fixed.item()


@pytest.mark.parametrize("kind", ["no_bn", "bn_eval"])
def test_without_batch_statistics_live_and_fixed_agree(kind):
    """No layer normalizes with batch statistics (none at all; batch norm in eval mode):
    the two gradients are the same."""
    net = bn_net()
    if kind == "no_bn":
        net[1], net[5] = nn.Identity(), nn.Tanh()
    else:
        net(batch(seed=5)[0])  # running statistics from another batch
        net.eval()
    x, y = batch()
    for dual_norm in (1, 2):
        live = exact_grad_norms(net, x, y, dual_norm, batch_stats="live")
        fixed = exact_grad_norms(net, x, y, dual_norm, batch_stats="fixed")
        torch.testing.assert_close(fixed.norms, live.norms, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(fixed.losses, live.losses, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dual_norm", [1, 2])
def test_fd_converges_to_exact_fixed_as_h_goes_to_zero(dual_norm):
    """fd along each image's own gradient (direction at the point, statistics fixed): its
    error is O(h) and falls with h, to < 1e-3 at h = 1e-4."""
    net, (x, y) = bn_net(), batch()
    exact = exact_grad_norms(net, x, y, dual_norm, batch_stats="fixed").norms.detach()
    errors = []
    for h in (1e-2, 1e-3, 1e-4):
        fd = fd_grad_norms(net, x, y, dual_norm, h).norms.detach()
        errors.append(((fd - exact).abs() / exact).max().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-3, errors
    live = exact_grad_norms(net, x, y, dual_norm).norms.detach()  # not what fd estimates
    assert ((fd - live).abs() / live).max().item() > 1e-2


def test_the_penalty_trains_through_exact_fixed():
    """The weights' gradient of the penalized loss with batch_stats=fixed (lam 1, the
    max's image unique) matches central differences of the loss in single weights: before
    the batch norm (its statistics move with the weight: the bias's gradient is 0, batch
    norm subtracts it), inside it, after it, the head's t."""
    net, (x, y) = bn_net(), batch()
    kw = {"dual_norm": 2, "lam": 1.0, "scaling": "per_example", "batch_stats": "fixed"}
    loss, _ = penalized_cross_entropy(net, x, y, **kw)
    named = dict(net.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    step = 1e-5
    for name, index in [("0.weight", (1, 0, 1, 2)), ("0.bias", (2,)), ("1.weight", (0,)),
                        ("1.bias", (1,)), ("4.weight", (3, 7)), ("5.t", ())]:
        p = named[name]
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                p[index] += sign * step
            values.append(penalized_cross_entropy(net, x, y, **kw)[0].item())
            with torch.no_grad():
                p[index] -= sign * step
        numeric = (values[0] - values[1]) / (2 * step)
        assert grads[name][index].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), name


def test_exact_fixed_updates_the_running_statistics_once():
    net, (x, y) = bn_net(), batch()
    plain = copy.deepcopy(net)
    plain(x)  # one train-mode forward pass
    loss, _ = penalized_cross_entropy(net, x, y, dual_norm=2, lam=1.0, batch_stats="fixed")
    loss.backward()
    for (name, a), b in zip(net.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=name)
    assert int(net[1].num_batches_tracked) == 1


def test_fd_with_live_statistics_is_refused(make_cfg):
    message = "lip.batch_stats=live cannot be combined with lip.method=fd"
    with pytest.raises(ValueError, match=message):
        lip_config(make_cfg("lip.method=fd", "lip.batch_stats=live").lip)
    with pytest.raises(ValueError, match=message):
        LipConfig(method=Method.fd, batch_stats=BatchStats.live)
    net, (x, y) = bn_net(), batch()
    with pytest.raises(ValueError, match=message):
        penalized_cross_entropy(net, x, y, dual_norm=2, lam=1.0, method="fd",
                                batch_stats="live")
    with pytest.raises(ConfigCompositionException, match="lip.batch_stats=frozen"):
        make_cfg("lip.batch_stats=frozen")  # not a value: Hydra refuses it
    # the method's own when not set; fd with fixed is what fd does
    assert BatchStats.of("exact", None) is BatchStats.live
    assert BatchStats.of("fd", None) is BatchStats.fixed
    assert lip_config(make_cfg("lip.method=fd", "lip.batch_stats=fixed").lip).batch_stats \
        is BatchStats.fixed


@pytest.mark.parametrize("setting", [None, "live", "fixed"])
def test_the_run_config_passes_batch_stats_to_the_exact_penalty(make_cfg, setting):
    """A run's objective gets lip.batch_stats (conf/lip/*.yaml: null, the method's own)."""
    overrides = ["model.width=4"] + ([f"lip.batch_stats={setting}"] if setting else [])
    module = build_module(make_cfg(*overrides))
    net = module.net.double().train()  # digits: (B, 1, 8, 8), 10 classes
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    state = copy.deepcopy(net.state_dict())
    _, logs = module.objective(net, x, y)
    net.load_state_dict(state)  # the same running statistics for the reference
    expected = exact_grad_norms(net, x, y, 2, batch_stats=setting or "live").norms
    torch.testing.assert_close(logs["grad_norm_max"], expected.max().detach(), rtol=1e-10,
                               atol=0)


def test_fd_accuracy_benchmark_compares_the_three_in_a_tiny_run(tmp_path):
    """benchmarks/fd_accuracy.py without a checkpoint: trains each method for a few steps
    per head and reports each estimate's size, their ratios, and each model's median."""
    spec = importlib.util.spec_from_file_location("fd_accuracy_modes",
                                                  REPO / "benchmarks" / "fd_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "modes.json"
    report = bench.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["head"] for r in report["models"]] == ["tanh", "linear"]
    for row in report["models"]:
        assert set(row["trained"]) == {"fd", "exact_fixed", "exact_live"}
        for trained in row["trained"].values():
            sizes = trained["grad_norm_max"]
            assert set(sizes) == {"fd", "fd_point", "exact_fixed", "exact_live", "own"}
            assert sizes["exact_fixed"] == pytest.approx(sizes["own"], rel=1e-4)
            assert sizes["fd_point"] == pytest.approx(sizes["exact_fixed"], rel=0.1)  # O(h)
            assert trained["median_l2"] is None or trained["median_l2"] >= 0
    assert set(report["ratios_to_own"]) >= {"tanh: exact_live", "linear: fd_point"}
