"""benchmarks/step.py runs in a tiny configuration and writes the JSON the README's table
is made from (no timing is asserted: benchmarks are not tests)."""

import copy
import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from lipexp.build import build_module

from .conftest import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "benchmarks" / "step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_benchmark_tiny_run_writes_its_json(tmp_path, one_thread):
    bench = load_benchmark()
    out = tmp_path / "bench.json"
    bench.main(["--models", "small_cnn", "--defences", "j0,j2-lip2-fd", "--heads", "tanh",
                "--steps", "2", "--warmup", "1", "--data-steps", "2", "--loader-seconds",
                "0.05", "--threads", "1", "--versus", "j2-lip2-fd:j2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert {"machine", "device", "torch", "batch_size", "precision", "threads", "steps",
            "results", "loader_images_per_s", "loader_augment_images_per_s"} <= report.keys()
    assert report["batch_size"] == 32 and report["device"] == "cpu"
    assert [(r["model"], r["defence"], r["head"]) for r in report["results"]] == [
        ("small_cnn", "j0", "tanh"), ("small_cnn", "j2-lip2-fd", "tanh")]
    for r in report["results"]:
        assert {"hand_ms", "lipexp_ms", "ratio_median", "ratio_q25_q75", "wall_ms",
                "wall_over_compute"} <= r.keys()
        assert r["steps"] == 2
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("hand_ms", "lipexp_ms",
                                                               "ratio_median", "wall_ms"))
    assert report["loader_images_per_s"] > 0
    (versus,) = report["versus"]
    assert (versus["model"], versus["a"], versus["b"], versus["steps"]) == (
        "small_cnn", "j2-lip2-fd", "j2", 2)
    assert all(math.isfinite(versus[k]) and versus[k] > 0 for k in ("a_ms", "b_ms",
                                                                    "ratio_median"))


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("defence", ["j0", "j1", "j2-lip2", "j2-lip2-fd", "j0-lip1",
                                     "j0-lip2-fd", "j2-lip2-fd-point", "j2-lip2-fd-reuse"])
def test_hand_step_makes_lipexp_s_update(make_cfg, defence, batch_norm):
    """The benchmark compares like with like: from the same weights, the hand-written step
    and lipexp's perturbation + objective give the same SGD update (with and without a batch
    norm layer, whose running statistics both steps start from)."""
    bench = load_benchmark()
    overrides = bench.DEFENCES[defence]
    sizes = (["adv.eps=0.3"] if "adv=j0" not in overrides else []) + (
        ["lip.h=0.05"] if "lip=none" not in overrides else [])
    if "lip.reuse_adv_gradient=true" in overrides:
        sizes = ["adv.eps=0.05", "lip.h=0.05"]
    cfg = make_cfg(*overrides, *sizes)
    module = build_module(cfg)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16),
                        nn.BatchNorm1d(16) if batch_norm else nn.Identity(), nn.Softplus(),
                        nn.Linear(16, 10)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    start = copy.deepcopy(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    bench.hand_step(net, opt, x, y, bench.hand_settings(cfg),
                    lambda: torch.autocast("cpu", enabled=False))
    hand = [p.detach().clone() for p in net.parameters()]
    net.load_state_dict(start)
    loss, _ = module.objective(net, module.perturb(net, x, y), y)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    for a, p, gr in zip(hand, net.parameters(), grads, strict=True):
        torch.testing.assert_close(a, p.detach() - 0.1 * gr)


def test_eval_benchmark_tiny_run_writes_its_json(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("bench_eval", REPO / "benchmarks" / "eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "eval.json"
    bench.main(["--models", "small_cnn", "--protocols", "default", "--images", "6",
                "--small-cnn-images", "6", "--threads", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert {"machine", "device", "torch", "bf16", "batch_size", "results"} <= report.keys()
    assert [(r["model"], r["attack"]) for r in report["results"]] == [
        ("small_cnn", "l2_pgd"), ("small_cnn", "linf_pgd")]
    for r in report["results"]:
        assert {"images", "seconds", "images_per_s", "forward_per_image", "backward_per_image",
                "median"} <= r.keys()
        assert r["images"] == 6 and r["forward_per_image"] > r["backward_per_image"] > 0


def test_fd_accuracy_benchmark_tiny_run_writes_its_json(make_cfg, tmp_path, one_thread):
    """benchmarks/fd_accuracy.py on a checkpoint of the default run's config (digits,
    J2-Lip2 & tanh, untrained): its JSON names every estimate; along each image's own
    gradient fd is close to its norm (O(h) error), along the attack's direction (eval mode:
    far from train mode's on an untrained network) at most that."""
    spec = importlib.util.spec_from_file_location("fd_accuracy",
                                                  REPO / "benchmarks" / "fd_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    module = build_module(make_cfg("model.width=4", "lip.method=fd"))
    ckpt = tmp_path / "last.ckpt"
    torch.save({"lipexp_config": module.config, "state_dict": module.state_dict()}, ckpt)
    out = tmp_path / "fd_accuracy.json"
    report = bench.main([str(ckpt), "--batches", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    ratios = report["ratios_to_own"]
    assert set(ratios) == {"exact", "fd_attack", "fd_point", "fd_reuse"}
    assert report["batches"] == 2 and ratios["fd_reuse"]["per_image"] is None
    assert 0.9 < ratios["fd_point"]["batch_max"]["median"] < 1.1, ratios["fd_point"]
    assert ratios["fd_attack"]["batch_max"]["max"] < 1.1, ratios["fd_attack"]
