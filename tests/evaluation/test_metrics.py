"""Evaluation metrics against brute-force computations: error curves, medians, stability
statistics (docs/method.md, "Evaluation protocol"), and the curve figure / CSV."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread
from torch import nn

from lipexp.evaluation.curves import (
    eps_grid,
    error_at,
    error_curve,
    median_distance,
    size_key,
    summarize,
)
from lipexp.evaluation.plots import plot_error_curves, write_curves_csv
from lipexp.evaluation.stability import STATISTICS, reduce_statistics, stability_statistics

from ..helpers import linear_model

INF = math.inf
C, H, W, K = 2, 4, 4, 5  # tiny images: channels, height, width, classes
N = C * H * W


def random_distances(n: int = 200, seed: int = 0) -> np.ndarray:
    """Distances with ties, zeros (misclassified clean) and +inf (never broken)."""
    rng = np.random.default_rng(seed)
    d = rng.lognormal(mean=-1.0, sigma=1.0, size=n)
    d[rng.random(n) < 0.1] = 0.0
    d[rng.random(n) < 0.15] = INF
    d[:10] = d[10]  # ties
    return d


# ---------------------------------------------------------------- curves


@pytest.mark.parametrize("as_tensor", [False, True])
def test_error_curve_is_the_empirical_distribution(as_tensor):
    d = random_distances()
    grid = eps_grid(d, num=100)
    # and exactly at the distances: the same float64 values on both sides (the <= convention,
    # no arithmetic to round)
    probe = np.concatenate([grid, np.unique(d[np.isfinite(d)])])
    curve = error_curve(torch.from_numpy(d) if as_tensor else d, probe)
    brute = np.array([np.mean(d <= e) for e in probe])
    np.testing.assert_array_equal(curve, brute)

    curve = error_curve(d, grid)
    assert len(grid) == 100 and grid[0] == 0 and np.all(np.diff(grid) > 0)
    assert np.all(np.diff(curve) >= 0) and np.all((curve >= 0) & (curve <= 1))
    assert curve[0] == np.mean(d == 0)  # clean error
    assert curve[-1] == 1 - np.mean(np.isinf(d))  # everything breakable is broken
    assert error_curve(d, [INF])[0] == 1.0  # +inf counts at eps = +inf only


@pytest.mark.parametrize(
    "d", [[0.0, 0.0], [INF, INF, INF], [0.0, INF], [0.3], [0.3, 0.3, INF]]
)
def test_eps_grid_fallbacks(d):
    grid = eps_grid(d, num=7)
    assert len(grid) == 7 and grid[0] == 0 and np.all(np.diff(grid) > 0)
    assert np.all(np.isfinite(grid))
    finite = [x for x in d if math.isfinite(x)]
    assert grid[-1] > max(finite, default=0)
    assert error_curve(d, grid)[-1] == len(finite) / len(d)


def test_invalid_distances():
    for bad in ([], [0.1, -0.1], [0.1, math.nan], [[0.1]]):
        with pytest.raises(ValueError):
            error_curve(bad, [0.0])


@pytest.mark.parametrize(
    "d, median",
    [
        ([0.3, 0.1, 0.2], 0.2),  # odd: the middle one
        ([0.4, 0.1, 0.3, 0.2], 0.2),  # even: the lower middle one
        ([INF, 0.1, INF, 0.2], 0.2),  # exactly half broken: finite
        ([INF, 0.1, INF], INF),  # fewer than half broken
        ([INF, 0.1, INF, INF, 0.0], INF),
        ([0.0, 0.0, 0.5], 0.0),  # mostly misclassified clean
        ([0.7], 0.7),
    ],
)
def test_median_convention(d, median):
    assert median_distance(d) == median
    assert median_distance(torch.tensor(d)) == pytest.approx(median)
    # the definition: the smallest d with C(d) >= 1/2
    assert error_curve(d, [median])[0] >= 0.5
    assert all(error_curve(d, [x])[0] < 0.5 for x in d if x < median)


def test_error_at_keys_and_values():
    d = [0.0, 0.05, 0.1, 1.0, 2 / 255, 8 / 255, INF, INF]
    sizes = [0, 0.1, 1.5, 2 / 255, 8 / 255]
    assert error_at(d, sizes) == {
        "0": 1 / 8,
        "0.1": 5 / 8,  # 0, 2/255, 8/255, 0.05, 0.1: a distance equal to eps counts
        "1.5": 6 / 8,
        "0.007843138": 2 / 8,
        "0.03137255": 3 / 8,
    }
    assert size_key(8 / 255) == size_key(np.float32(8 / 255)) == "0.03137255"
    assert [size_key(s) for s in (3.0, 1e-5, 0.5 / 255)] == ["3", "0.00001", "0.0019607844"]
    # a float32 attack at 8/255 reports float32(8/255) > 8/255: still broken at 8/255
    d32 = torch.tensor([8 / 255, 2 / 255], dtype=torch.float32)
    assert float(d32[0]) > 8 / 255
    assert error_at(d32, [8 / 255]) == {"0.03137255": 1.0}


def test_summarize_is_json_ready():
    d = random_distances(50)
    s = summarize(torch.from_numpy(d).float(), [0.1, 1.5], num=20)
    assert s["n_images"] == 50 and s["n_unbroken"] == int(np.isinf(d).sum())
    assert s["median"] == median_distance(d.astype(np.float32))
    assert set(s["error_at"]) == {"0.1", "1.5"}
    assert len(s["curve"]["eps"]) == len(s["curve"]["error"]) == 20
    for v in [s["median"], *s["error_at"].values(), *s["curve"]["eps"], *s["curve"]["error"]]:
        assert type(v) is float
    assert summarize([INF, INF], [0.1])["median"] == INF


# ---------------------------------------------------------------- stability statistics


def conv_bn_model() -> nn.Module:
    """Conv, BatchNorm with non-trivial running statistics, linear: K = 5 classes, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(C, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
        nn.Linear(3 * H * W, K),
    ).double()
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.2, 3.0)
    bn.weight.data.uniform_(0.5, 2.0)
    bn.bias.data.uniform_(-0.5, 0.5)
    return model


def brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics from each example's full Jacobian (autograd.functional, eval mode)."""
    model.eval()
    out = {name: [] for name in STATISTICS}
    for xi, yi in zip(x, y):
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], xi)  # (K, C, H, W)
        jac = jac.reshape(K, -1)  # (K, n)
        grad = torch.autograd.functional.jacobian(
            lambda v, yi=yi: F.cross_entropy(model(v[None]), yi[None]), xi
        ).flatten()  # (n,)
        out["grad_loss_l2"].append(grad.norm(p=2))
        out["grad_loss_l1"].append(grad.norm(p=1))
        out["jac_2_inf"].append(jac.norm(p=2, dim=1).max())  # largest row l2 norm
        out["jac_1_1"].append(jac.abs().sum(dim=0).max())  # largest column l1 norm
    return {name: torch.stack(v) for name, v in out.items()}


@pytest.mark.numerics
def test_stability_statistics_equal_brute_force(device):
    """Against each example's full Jacobian, and the same for channels-last input and
    model. Float64: the batched rows and the per-example Jacobians (and the layouts'
    convolution kernels) sum in other orders, ~1e-16 relative; rtol 1e-10 is far above
    that and far below any error of the method (O(1))."""
    model = conv_bn_model().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, C, H, W, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, K, (6,), generator=g).to(device)
    # a state to preserve: train mode, some .grad set, some None
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    running = model[1].running_mean.clone()

    stats = stability_statistics(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n])
    assert torch.equal(model[1].running_mean, running)  # BN ran in eval mode

    expected = brute_force(model, x, y)
    for name in STATISTICS:
        assert stats[name].shape == (6,) and not stats[name].requires_grad
        torch.testing.assert_close(stats[name], expected[name], rtol=1e-10, atol=1e-12)

    # channels_last input, and model too: the same statistics
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for name, s in stability_statistics(model, x_cl, y).items():
        torch.testing.assert_close(s, stats[name], rtol=1e-10, atol=1e-12)
    model.to(memory_format=torch.channels_last)
    for name, s in stability_statistics(model, x_cl, y).items():
        torch.testing.assert_close(s, stats[name], rtol=1e-10, atol=1e-12)


@pytest.mark.numerics
@pytest.mark.parametrize("k", [K, 100])
def test_linear_model_jacobian_norms_are_those_of_w(k, device):
    model = linear_model(N, k, torch.float64, 0)
    x = torch.rand(3, C, H, W, dtype=torch.float64)
    y = torch.randint(0, k, (3,))
    model, x, y = model.to(device), x.to(device), y.to(device)
    w = model[1].weight.detach()  # (k, n): J = W at every x
    stats = stability_statistics(model, x, y)
    # Float64. Each Jacobian row is W[c] exactly (the backward pass multiplies W by a one-hot
    # vector: products by 1 and 0, sums with 0); only the reductions round, summing the same
    # terms in other orders than w's: a sum of m nonnegative terms is within (m - 1) u of
    # the exact one (u = eps / 2) in any order, so two such sums differ by < m eps relative.
    # m = N = 32 for a row's squares (the root halves it), m = k for a column's |w|.
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(stats["jac_2_inf"], w.norm(dim=1).max().expand(3),
                               rtol=N * eps, atol=0)
    torch.testing.assert_close(stats["jac_1_1"], w.abs().sum(dim=0).max().expand(3),
                               rtol=k * eps, atol=0)
    # grad_x l = W^T (softmax(Wx + b) - onehot(y))
    p = torch.softmax(model(x), dim=1) - F.one_hot(y, k)
    torch.testing.assert_close(stats["grad_loss_l2"], (p @ w).norm(dim=1))


def test_reduce_statistics():
    per_example = {"grad_loss_l2": torch.tensor([1.0, 3.0, 2.0]), "jac_1_1": torch.tensor([4.0])}
    assert reduce_statistics(per_example) == {
        "grad_loss_l2": {"max": 3.0, "mean": 2.0},
        "jac_1_1": {"max": 4.0, "mean": 4.0},
    }


# ---------------------------------------------------------------- figure and CSV


def test_plot_and_csv(tmp_path):
    curves = {
        "pgd_l2": {"norm": "l2", "curve": summarize(random_distances(seed=1), [])["curve"]},
        "fgsm_l2": {"norm": "l2", "curve": summarize(random_distances(seed=2), [], 30)["curve"]},
        "pgd_linf": {"norm": "linf", "curve": summarize(random_distances(seed=3) / 50, [],
                                                         50)["curve"]},
    }
    png = tmp_path / "figs" / "curves.png"
    plot_error_curves(curves, png, title="tiny model")
    assert png.stat().st_size > 0
    image = imread(png)  # (height, width, RGBA)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 1.5 * image.shape[0]
    assert list(png.parent.iterdir()) == [png]  # no temporary file left

    plot_error_curves({"pgd_l2": curves["pgd_l2"]}, png)  # an empty panel; overwrite
    assert imread(png).shape == image.shape

    path = tmp_path / "curves.csv"
    write_curves_csv(curves, path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 + 30 + 50
    assert rows[0] == {"attack": "pgd_l2", "norm": "l2", "eps": "0.0",
                       "error": repr(curves["pgd_l2"]["curve"]["error"][0]),
                       "error_low": "", "error_high": ""}  # a curve without its band
    assert {(r["attack"], r["norm"]) for r in rows} == {(a, c["norm"]) for a, c in curves.items()}


def test_draw_error_curve():
    """The one drawing of a curve (run figure and report): a step over the positive sizes, in
    %, C(0) in the label and as a triangle on the left edge in the line's colour."""
    from matplotlib.figure import Figure

    from lipexp.evaluation.plots import draw_error_curve

    ax = Figure().subplots()
    curve = {"eps": [0.0, 0.1, 0.2], "error": [0.1, 0.5, 1.0]}
    line = draw_error_curve(ax, curve, "pgd", color="C3", ls="--")
    assert line.get_label() == "pgd (C(0) 10.0%)" and line.get_linestyle() == "--"
    np.testing.assert_array_equal(line.get_xdata(), [0.1, 0.2])
    np.testing.assert_array_equal(line.get_ydata(), [50.0, 100.0])
    (marker,) = [m for m in ax.lines if m is not line]
    assert marker.get_marker() == ">" and marker.get_color() == line.get_color()
    np.testing.assert_array_equal(marker.get_ydata(), [10.0])

    ax = Figure().subplots()
    line = draw_error_curve(ax, curve, clean_marker=False)  # a further seed: no label, no mark
    assert list(ax.lines) == [line] and line.get_label().startswith("_")
    ax = Figure().subplots()
    line = draw_error_curve(ax, {"eps": [0.1, 0.2], "error": [0.5, 1.0]}, "no C(0)")
    assert list(ax.lines) == [line] and line.get_label() == "no C(0)"
