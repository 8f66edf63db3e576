"""Attacks (lipexp.attacks) against closed forms: threat models, PGD and its one-step
configs, and the adversarial distance search against the exact distances of linear models."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lipexp.attacks.pgd import PGD
from lipexp.attacks.search import adversarial_distances
from lipexp.attacks.threat import THREATS, Norm

from ..helpers import ATTACK_D as D
from ..helpers import ATTACK_K as K
from ..helpers import ATTACK_SHAPE as SHAPE
from ..helpers import (
    DUAL,
    assert_model_left_as_found,
    attack_linear_model,
    conv_batch,
    conv_model,
    exact_distances,
    interior_batch,
    linear_model,
    max_rel_gap,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- threat models ----------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("norm", list(Norm))
def test_project_stays_in_ball_and_box(norm, device):
    """Float32: the projected perturbation's norm exceeds eps only by rounding (a relative
    1e-6 and 1e-7 absolute: ~10 ulps); eps 0 gives x itself, exactly (x + 0 * delta)."""
    threat, g = THREATS[norm], torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 4, 4, generator=g).to(device)
    eps = torch.linspace(0.0, 2.0, 8).to(device)  # per image, 0 included
    x_adv = threat.project(x + 3 * torch.randn(8, 3, 4, 4, generator=g).to(device), x, eps)
    assert (x_adv >= 0).all() and (x_adv <= 1).all()
    assert (threat.norm(x_adv - x) <= eps * (1 + 1e-6) + 1e-7).all()
    assert (x_adv[0] == x[0]).all()  # eps 0
    inside = x + 1e-3 * torch.randn(8, 3, 4, 4, generator=g).to(device) * (
        eps[:, None, None, None] > 0)
    inside = inside.clamp(0, 1)
    torch.testing.assert_close(threat.project(inside, x, eps), inside)  # already feasible


def test_l2_project_scales_onto_the_sphere(device):
    x = torch.full((2, 1, 2, 2), 0.5, device=device)
    delta = torch.tensor([0.3, -0.4, 0.0, 0.0], device=device).reshape(1, 1, 2, 2).repeat(
        2, 1, 1, 1)  # norm 0.5
    x_adv = THREATS[Norm.l2].project(x + delta, x, torch.tensor([0.1, 1.0], device=device))
    torch.testing.assert_close(x_adv[0], x[0] + 0.2 * delta[0])
    torch.testing.assert_close(x_adv[1], x[1] + delta[1])


def test_step_directions(device):
    x = torch.full((2, 1, 2, 2), 0.5, device=device)
    grad = torch.tensor([3.0, -4.0, 0.0, 0.0], device=device).reshape(1, 1, 2, 2).repeat(
        2, 1, 1, 1)
    grad[1] = 0  # no gradient: no move
    size = torch.tensor([0.1, 0.1], device=device)
    l2, linf = THREATS[Norm.l2].step(x, grad, size), THREATS[Norm.linf].step(x, grad, size)
    torch.testing.assert_close(l2[0], x[0] + 0.1 * grad[0] / 5)
    torch.testing.assert_close(linf[0], x[0] + 0.1 * grad[0].sign())
    assert (l2[1] == x[1]).all() and (linf[1] == x[1]).all()


@pytest.mark.numerics
@pytest.mark.parametrize("norm", list(Norm))
def test_init(norm, device):
    """A random start lies in the ball up to rounding (the tolerance of the previous test)."""
    threat, g = THREATS[norm], torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 4, 4, generator=g).to(device)
    eps = torch.linspace(0.0, 1.0, 16).to(device)
    assert torch.equal(threat.init(x, eps, random=False), x)
    torch.manual_seed(1)  # not the seed of x
    x0 = threat.init(x, eps, random=True)
    assert (x0 >= 0).all() and (x0 <= 1).all()
    assert (threat.norm(x0 - x) <= eps * (1 + 1e-6) + 1e-7).all()
    assert (threat.norm(x0 - x)[1:] > 0).all()  # actually random


# --- PGD --------------------------------------------------------------------------------


def test_pgd_validation():
    assert PGD("linf").norm is Norm.linf and PGD(Norm.l2).norm is Norm.l2
    with pytest.raises(ValueError, match="'l2', 'linf'"):
        PGD("l1")
    for bad in ({"steps": 0}, {"rel_step": 0.0}, {"targets": -1}):
        with pytest.raises(ValueError):
            PGD("l2", **bad)


@pytest.mark.numerics
@pytest.mark.parametrize("norm", list(Norm))
def test_one_step_configs_are_fgsm_and_gradient_attack(norm, device):
    """FGSM: clip(x + eps sign(g)); gradient attack: clip(x + eps g / ||g||_2), with
    g = W^T (softmax(z) - onehot(y)); large eps so that the clip binds. Float64: the
    attack's gradient and the formula's differ by ~1e-16, and none of these images has a
    gradient component or a logit margin anywhere near that (a sign or a success to flip)."""
    model = attack_linear_model(torch.float64).to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(16, *SHAPE, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, K, (16,), generator=g).to(device)
    eps = torch.linspace(0.05, 0.5, 16, dtype=torch.float64).to(device)
    attack = PGD(norm=norm, steps=1, rel_step=1.0, targets=0)
    x_adv, success = attack(model, x, y, eps)

    w = model[1].weight
    z = model(x).detach()
    grad = ((z.softmax(1) - F.one_hot(y, K).double()) @ w).reshape(x.shape)
    e = eps[:, None, None, None]
    unit_l2 = grad / grad.flatten(1).norm(dim=1)[:, None, None, None]
    step = grad.sign() if norm == Norm.linf else unit_l2
    expected = (x + e * step).clamp(0, 1)
    wrong = z.argmax(1) != y  # misclassified clean: returned as they are (norm 0)
    expected[wrong] = x[wrong]
    assert 0 < wrong.sum() < len(y)
    assert ((x + e * step) < 0).any() or ((x + e * step) > 1).any()  # the clip binds somewhere
    torch.testing.assert_close(x_adv, expected)
    torch.testing.assert_close(success, model(expected).argmax(1) != y)


@pytest.mark.parametrize("pgd", [PGD("l2"), PGD("l2", targets=0, early_stop=True)])
def test_eps_zero_is_only_checked_clean(pgd, device):
    """eps 0 returns x itself (no arithmetic on it); 1e-6 is 4 orders of magnitude below
    these images' distances (~0.05 and more)."""
    model = attack_linear_model().to(device)
    x, y = interior_batch(model, b=6, wrong=2)
    x_adv, success = pgd(model, x, y, torch.zeros(6, device=device))
    assert torch.equal(x_adv, x)
    assert success.tolist() == [True, True, False, False, False, False]
    eps = torch.tensor([0.0, 1.0, 0.0, 0.0, 1e-6, 1e-6], device=device)
    x_adv, success = pgd(model, x, y, eps)
    assert success[:2].all() and not success[2:].any()  # clean mistakes, sizes too small


@pytest.mark.numerics
def test_bf16_autocast_does_not_decide_the_clean_mistakes(device):
    """Logits offset by 100, where bf16 keeps 2 or 3 significant digits: classes 0 and 1
    within about 0.1 of each other on every image, so under bf16 the clean argmax of many
    images differs from float32's. The clean check is in float32, so an image correct in
    float32 still gets its distance (not +inf, as when a bf16 "clean mistake" blocked every
    later success) and no image is called broken at a size too small to break it.
    (Which images flip depends on the bf16 kernels' rounding; that many do, not.)"""
    from lipexp.attacks.distance import PGDSearch

    model = linear_model(16, 3, seed=0).eval()
    x = torch.rand(200, 1, 4, 4)
    model, x = model.to(device), x.to(device)
    with torch.no_grad():
        model[1].bias.add_(100.0)
        z = model(x)
        model[1].bias[1] += (z[:, 0] - z[:, 1]).median()  # classes 0 and 1 neck and neck
        z = model(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            flips = (model(x).argmax(1) != z.argmax(1)).sum()
    y = z.argmax(1)
    assert flips > 10
    search = PGDSearch("l2", eps_init=0.01, eps_max=20.0)
    fp32 = search.distances(model, x, y)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        bf16 = search.distances(model, x, y)
        _, broken = PGD("l2", targets=0, early_stop=True)(model, x, y, 1e-9)
    assert fp32.isfinite().all() and bf16.isfinite().all() and not broken.any()


@pytest.mark.numerics
@pytest.mark.parametrize("norm", list(Norm))
def test_pgd_outputs_feasible_and_smallest_successful(norm, device):
    """Float32: sizes 30% either side of the exact distances, so no success hangs on
    rounding; the examples' norms may undercut the exact minimum by float32's rounding of
    the logits only (1e-5 relative: ~1e-7 times |z| / margin)."""
    model = attack_linear_model().to(device)
    x, y = interior_batch(model, b=16)
    x = x.clamp(0.45, 0.55)
    x[:8, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.999], device=device)  # on and near the box
    with torch.no_grad():
        y[3:] = model(x[3:]).argmax(1)
    exact, delta = exact_distances(model, x, y, norm)
    eps = exact.float() * torch.tensor([0.7, 1.3], device=device).repeat(8)  # either side
    eps[3] = 0.0
    for random_start in (False, True):
        torch.manual_seed(0)
        x_adv, success = PGD(norm, random_start=random_start)(model, x, y, eps)
        assert (x_adv >= 0).all() and (x_adv <= 1).all()
        sizes = THREATS[norm].norm(x_adv - x)
        assert (sizes <= eps * (1 + 1e-6) + 1e-7).all()
        assert success[:3].all() and (sizes[:3] == 0).all()  # wrong clean: x itself
        # an exact attack on a linear model: success iff eps exceeds the exact distance
        reachable = ((x.flatten(1) + delta - 0.5).abs() <= 0.5).all(1)  # minimizer in box
        clear = reachable & ((eps.double() - exact).abs() > 1e-4 * exact)
        assert clear.sum() >= 6 and success[clear].any() and not success[clear].all()
        assert torch.equal(success[clear], (eps.double() > exact)[clear])
        assert (sizes[success].double() >= exact[success] * (1 - 1e-5)).all()


# --- distances --------------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("norm", list(Norm))
def test_distances_of_a_linear_model_are_exact(norm, device):
    """Float32: below the exact minimum by the logits' rounding only (1e-5 relative)."""
    model = attack_linear_model().to(device)
    x, y = interior_batch(model)
    exact, delta = exact_distances(model, x, y, norm)
    # the minimizers (and 10% beyond) lie well inside [0, 1]: the box does not bind
    beyond = x.flatten(1).double() + 1.1 * delta
    assert (beyond > 0.05).all() and (beyond < 0.95).all()
    assert (exact[:3] == 0).all() and (exact[3:] > 0).all()

    found = adversarial_distances(model, x, y, PGD(norm), norm, eps_init=0.01, eps_max=10.0)
    assert (found[:3] == 0).all()
    assert (found.double() >= exact * (1 - 1e-5)).all()  # no example beats the exact minimum
    gap = max_rel_gap(found, exact)
    print(f"{norm.value}: worst relative gap to the exact distance {gap:.4f}")
    assert gap <= 0.02


@pytest.mark.numerics
@pytest.mark.parametrize("norm", list(Norm))
def test_the_default_search_is_exact_on_a_linear_model(norm, device):
    """PGDSearch's defaults (PGD-10, the 3 nearest targets, early stop, x1.25 steps), as
    every run's evaluation uses them: within 2% of the exact minimum for every image
    (float64: below it by rounding only, 1e-9)."""
    from lipexp.attacks.distance import PGDSearch

    model = attack_linear_model(torch.float64).to(device)
    x, y = interior_batch(model)
    exact, _ = exact_distances(model, x, y, norm)
    found = PGDSearch(norm, eps_init=1e-3, eps_max=10.0).distances(model, x, y)
    assert (found[:3] == 0).all() and (found.double() >= exact * (1 - 1e-9)).all()
    assert max_rel_gap(found, exact) <= 0.02


@pytest.mark.numerics
@pytest.mark.parametrize("factor", [1.25, 1.6, 2.0])
def test_the_search_factor_changes_the_path_not_the_answer(factor, device):
    model = attack_linear_model(torch.float64).to(device)
    x, y = interior_batch(model)
    exact, _ = exact_distances(model, x, y, Norm.l2)
    for start in (0.01, 10 * exact.max().item()):  # far below and far above every distance
        found = adversarial_distances(model, x, y, PGD("l2"), "l2", eps_init=start,
                                      eps_max=20.0, factor=factor)
        assert max_rel_gap(found, exact) <= 0.02
    with pytest.raises(ValueError, match="factor"):
        adversarial_distances(model, x, y, PGD("l2"), "l2", 0.01, 10.0, factor=2.5)


@pytest.mark.numerics
@pytest.mark.parametrize("norm", list(Norm))
def test_early_stop_succeeds_exactly_where_the_full_run_does(norm, device):
    """The iterates are the same until an image's first success, so success at a size is
    the same with and without early stop; the early example is no smaller, and the broken
    images leave the batch (fewer forward passes).

    "The same" up to rounding: once images leave, the smaller batch runs through other
    kernels (another matmul blocking), so later iterates differ by ulps. Float64 makes that
    ~1e-16 relative: the sizes are 20% below and 10% above the exact distances, so no
    success hangs on it, and the norms compare with a 1e-12 slack (norms < 1)."""
    model = attack_linear_model(torch.float64).to(device)
    x, y = interior_batch(model)
    exact, _ = exact_distances(model, x, y, norm)
    eps = exact * torch.tensor([0.8, 1.1], device=device).repeat(16).double()  # below, within
    passes = []
    model.register_forward_pre_hook(lambda m, a: passes.append(len(a[0])))
    runs = {}
    for early in (False, True):
        passes.clear()
        x_adv, ok = PGD(norm, targets=2, early_stop=early)(model, x, y, eps)
        runs[early] = x_adv, ok, sum(passes)
    (full, ok_full, n_full), (first, ok_first, n_first) = runs[False], runs[True]
    assert ok_full.any() and not ok_full.all()
    assert torch.equal(ok_full, ok_first) and n_first < n_full
    threat = THREATS[norm]
    assert (threat.norm(first - x)[ok_first] >= threat.norm(full - x)[ok_full] - 1e-12).all()
    assert (threat.norm(first - x) <= eps * (1 + 1e-9)).all()


@pytest.mark.numerics
def test_targets_given_are_the_classes_aimed_at(device):
    """On the model of the next test (class 1: highest wrong logit, 0.25 away; class 2: 0.1
    away), one targeted run towards the class given breaks at 0.12 only towards class 2
    (20% beyond one boundary, half of the other: no rounding decides)."""
    model, x, y = closest_class_problem(device)
    pgd = PGD("l2", targets=1)
    for cls, broken in ((1, False), (2, True)):
        _, ok = pgd(model, x, y, 0.12, targets=torch.full((4, 1), cls, device=device))
        assert ok.all() == broken and ok.any() == broken
    _, ok = pgd(model, x, y, 0.12)  # default: the highest wrong logit, class 1
    assert not ok.any()


@pytest.mark.numerics
def test_first_order_distances_are_exact_per_class_on_a_linear_model(device):
    from lipexp.attacks.first_order import first_order_distances

    model = attack_linear_model(torch.float64).to(device)
    x, y = interior_batch(model, wrong=0)
    w, b = model[1].weight, model[1].bias
    classes = (y[:, None] + torch.tensor([1, 2, 5], device=device)) % K  # (B, 3) wrong classes
    for norm in Norm:
        d = first_order_distances(model, x, y, classes, norm)
        z = x.flatten(1) @ w.T + b
        margin = z.gather(1, y[:, None]) - z.gather(1, classes)
        dual = torch.linalg.vector_norm(w[y][:, None] - w[classes], ord=DUAL[norm], dim=2)
        torch.testing.assert_close(d, (margin / dual).detach().clamp_min(0))


def test_unbroken_images_get_inf(device):
    model = attack_linear_model().to(device)
    x, y = interior_batch(model, b=8, wrong=2)
    found = adversarial_distances(model, x, y, PGD("l2"), "l2", eps_init=1e-5, eps_max=1e-4)
    assert (found[:2] == 0).all() and found[2:].isinf().all()


def closest_class_problem(device="cpu"):
    """y = 0; class 1 has the highest wrong logit but its boundary is 0.25 away in l2
    (||w_0 - w_1|| = 2, gap 0.5); class 2 is far below (gap 10) but 0.1 away
    (||w_0 - w_2|| = 100). Float32, on ``device``."""
    w, bias = torch.zeros(K, D), torch.zeros(K)
    w[1, 1], bias[1] = 2.0, -1.5  # z_1 = -0.5 at x_1 = 0.5
    w[2, 2], bias[2] = 100.0, -60.0  # z_2 = -10 at x_2 = 0.5
    for j in range(3, K):  # the rest: far in both senses
        w[j, j], bias[j] = 0.5, -20.0
    model = linear_model(D, K)
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.copy_(bias)
    x = 0.45 + 0.1 * torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 1:3] = 0.5
    y = torch.zeros(4, dtype=torch.long)
    return model.to(device), x.to(device), y.to(device)


@pytest.mark.numerics
def test_targeted_runs_find_the_closest_class(device):
    """On closest_class_problem the cross-entropy leans towards class 1, the targeted run
    towards class 2 finds the exact distance; ranked by first-order distance (the default
    search), class 2 is the first target, so one targeted run is enough. The first-order
    start is the exact distance 0.1, where the logits tie; either way rounding decides
    there, the search ends within 1.6% (max_rel_gap)."""
    from lipexp.attacks.distance import PGDSearch

    model, x, y = closest_class_problem(device)
    z = model(x).detach()
    assert (z[:, 1:].argmax(1) == 0).all()  # class 1 has the highest wrong logit
    exact, _ = exact_distances(model, x, y, Norm.l2)
    torch.testing.assert_close(exact.cpu(), torch.full((4,), 0.1, dtype=torch.float64))

    def distances(targets):
        return adversarial_distances(model, x, y, PGD("l2", targets=targets), "l2", 0.01, 10.0)

    assert max_rel_gap(distances(9), exact) <= 0.02
    assert (distances(0).double() > 1.5 * exact).all()  # the untargeted run alone fails
    for order in ("nearest", "logit"):
        found = PGDSearch("l2", targets=1, target_order=order).distances(model, x, y)
        assert (max_rel_gap(found, exact) <= 0.02) == (order == "nearest"), (order, found)


# --- the model is left as it was ---------------------------------------------------------


def test_model_state_is_untouched(device):
    def attack(model, x, y):
        pgd = PGD("linf", steps=3, targets=2)
        pgd(model, x, y, torch.full((len(x),), 0.05, device=device))
        adversarial_distances(model, x, y, pgd, "linf", 0.01, 0.2)

    assert_model_left_as_found(attack, device)


@pytest.mark.numerics
def test_channels_last_gives_the_same_distances(device):
    """The layouts run other convolution kernels. Float64: their logits differ by ~1e-16,
    and a decision flips only for an iterate that close to a boundary; rtol 1e-4 is far
    above that rounding and far below a flip's effect (a bracket, 2%)."""
    model = conv_model(torch.float64).to(device)
    x, y = conv_batch(model)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert model_cl[0].weight.is_contiguous(memory_format=torch.channels_last)
    for norm in Norm:
        d = adversarial_distances(model, x, y, PGD(norm), norm, 0.01, 10.0)
        d_cl = adversarial_distances(model_cl, x_cl, y, PGD(norm), norm, 0.01, 10.0)
        assert d.isfinite().all() and d[0] == 0
        torch.testing.assert_close(d_cl, d, rtol=1e-4, atol=0.0)


@pytest.mark.numerics
def test_works_under_inference_mode(device, monkeypatch):
    """Lightning validates and tests under torch.inference_mode: the attack still runs, with
    the same shapes, kernels and threads, so the same distances (float32 tolerance). On
    CUDA cuDNN's deterministic algorithms: its default input-gradient ones may sum with
    atomics, and the same code twice would then round differently."""
    if device.type == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model = conv_model().to(device)
    x, y = conv_batch(model)
    attack = PGD("l2", steps=3, targets=1)
    expected = adversarial_distances(model, x, y, attack, "l2", 0.05, 10.0)
    with torch.inference_mode():
        x, y = x.clone(), y.clone()  # inference tensors, as a test_step receives them
        found = adversarial_distances(model, x, y, attack, "l2", 0.05, 10.0)
    torch.testing.assert_close(found, expected)
    assert found.isfinite().all()
