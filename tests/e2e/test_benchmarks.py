"""benchmarks/step.py runs in a tiny configuration and writes the JSON the README's table
is made from (no timing is asserted: benchmarks are not tests)."""

import copy
import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from lipexp.runs.build import build_module

from ..helpers import REPO


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


def load_script(name: str, file: str):
    """The script ``benchmarks/<file>`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_gpu_check():
    return load_script("gpu_check", "gpu_check.py")


def test_gpu_check_cpu_dry_run_runs_every_part(tmp_path, one_thread):
    """benchmarks/gpu_check.py --device cpu --quick (tiny sizes): every part runs and writes
    its fragment, and the merged JSON and Markdown carry the machine, the versions and every
    goal with a verdict (timings and verdicts are not asserted: a CPU is no H100); --only
    reruns one part (an error sentinel in its fragment comes back ok), leaves the others'
    fragments byte for byte, reports an earlier run's error as stale (exit status 0) and
    drops a fragment of other sources."""
    bench = load_gpu_check()
    report = bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check_cpu_quick.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert {"machine", "versions", "device", "quick", "date", "parts", "goals", "budgets",
            "exit_status", "errors_this_run", "stale_errors",
            "dropped_fragments"} <= saved.keys()
    assert {"torch", "pytorch_lightning", "python", "lipexp", "lipexp_commit", "cuda",
            "tf32"} <= saved["versions"].keys()
    assert set(saved["versions"]["tf32"]) == {"cuda_matmul_allow_tf32", "cudnn_allow_tf32",
                                              "float32_matmul_precision"}
    assert saved["quick"] and saved["device"] == "cpu"
    assert (saved["exit_status"], saved["errors_this_run"], saved["stale_errors"],
            saved["dropped_fragments"]) == (0, [], [], [])
    assert list(saved["parts"]) == list(bench.PARTS)
    parts_dir = tmp_path / "gpu_check_cpu_quick_parts"
    for name, part in saved["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert part["seconds"] > 0 and part["budget_s"] == saved["budgets"][name]
        assert (parts_dir / f"{name}.json").exists()
    assert saved["budgets"] == bench.budgets(bench.xdist_available())
    assert [g["id"] for g in saved["goals"]] == [g.id for g in bench.GOALS]
    for g in saved["goals"]:
        assert g["verdict"] in ("pass", "fail", "not-run") and g["goal"] and g["detail"]
        assert g["verdict"] == "not-run" or math.isfinite(g["value"])
    assert saved["goals"][0]["verdict"] == "not-run"  # CUDA tests: collected, not run here
    parts = saved["parts"]
    assert isinstance(parts["tests"]["collected"], int)
    assert parts["tests"]["markers"] == "gpu and not slow"
    assert {r["defence"] for r in parts["step"]["rows"]} == {"j0", "j2-lip2-fd"}
    assert all(r["precision_label"] == "fp32" for r in parts["step"]["rows"])
    assert len(parts["step"]["versus"]) == 1 and parts["compile"]["dynamo_disabled"]
    assert [r["kind"] for r in parts["step"]["fd_over_j0"]] == ["paired, hand-written"]
    assert [r["kind"] for r in parts["compile"]["fd_over_j0"]] == ["unpaired, lipexp's medians"]
    assert all(r["compile"] for r in parts["compile"]["rows"])
    assert parts["epoch"]["steps"] == 4 and len(parts["epoch"]["pairs"]) == 1
    assert [a["attack"] for a in parts["eval"]["attacks"]] == ["l2_pgd", "linf_pgd"]
    rounds = parts["concurrent"]["rounds"]
    assert [r["processes"] for r in rounds] == [1, 2]
    assert all(len(r["per_process_images_per_s"]) == r["processes"] for r in rounds)
    markdown = (tmp_path / "gpu_check_cpu_quick.md").read_text()
    assert "Dry run" in markdown and all(g.text in markdown for g in bench.GOALS)

    # --only epoch: sentinels first. epoch's fragment says error (the rerun must replace
    # it); eval's says error (an earlier run's: stale, not in the exit status); concurrent's
    # comes from other sources (dropped); step's must stay byte for byte.
    def rewrite(name, **changes):
        path = parts_dir / f"{name}.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    rewrite("epoch", status="error", error_line="sentinel")
    rewrite("eval", status="error", error_line="sentinel")
    rewrite("concurrent", source_sha256="0" * 16)
    step_bytes = (parts_dir / "step.json").read_bytes()
    again = bench.main(["--device", "cpu", "--quick", "--only", "epoch", "--out",
                        str(tmp_path)])
    statuses = {name: p["status"] for name, p in again["parts"].items()}
    assert statuses == {"tests": "ok", "step": "ok", "compile": "ok", "epoch": "ok",
                        "eval": "error", "concurrent": "not-run"}
    assert (parts_dir / "step.json").read_bytes() == step_bytes
    assert again["parts"]["step"] == parts["step"]
    assert again["parts"]["epoch"]["pairs"] and "error_line" not in again["parts"]["epoch"]
    assert (again["errors_this_run"], again["stale_errors"], again["exit_status"]) == (
        [], ["eval"], 0)
    assert [d["part"] for d in again["dropped_fragments"]] == ["concurrent"]
    assert json.loads((tmp_path / "gpu_check_cpu_quick.json").read_text())["stale_errors"] \
        == ["eval"]


def test_gpu_check_exit_status_and_markdown_without_numbers(tmp_path):
    """The exit status: 1 for failing CUDA tests (a measurement part's failed goal leaves it
    0) and for an error in a part run now, not for an earlier run's; a report whose numbers
    are None or NaN still renders (n/a)."""
    bench = load_gpu_check()
    head = {"device": "cpu", "quick": True, "date": "2026-01-01T00:00:00Z", "command": [],
            "machine": {"cpu": "test cpu"}, "versions": {"source_sha256": "abc"},
            "budgets": bench.PARTS}

    def write(name, **fields):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"status": "ok", "quick": True, "source_sha256": "abc", "seconds": 1.0} | fields))

    write("tests", goals={"tests": {"value": 2, "detail": "2 failed", "verdict": "fail"}})
    write("eval", goals={"eval.seconds": {"value": 99.0, "detail": "slow"}})
    assert bench.merge(tmp_path, head)["exit_status"] == 1
    write("tests", goals={"tests": {"value": 0, "detail": "ok", "verdict": "pass"}})
    report = bench.merge(tmp_path, head)
    assert report["exit_status"] == 0  # eval's goal failed: a measurement
    assert [g["verdict"] for g in report["goals"] if g["id"] == "eval.seconds"] == ["fail"]
    write("epoch", status="error", error_line="boom")
    assert bench.merge(tmp_path, head)["exit_status"] == 0  # stale: not this run's
    assert bench.merge(tmp_path, head, {"epoch": "error"})["exit_status"] == 1
    nan = float("nan")
    write("step", rows=[{"model": "m", "batch_size": 8, "precision": "32", "defence": "j0",
                         "hand_ms": None, "lipexp_ms": nan, "ratio_median": None}],
          fd_over_j0=[{"model": "m", "batch_size": 8, "precision": "32", "ratio": None,
                       "kind": "unpaired"}], seconds=None,
          goals={"step.lipexp_vs_hand": {"value": None, "detail": None}})
    write("eval", bf16=False, seconds=nan, setup_s=None, attacks=[{"attack": "l2_pgd"}])
    report = bench.merge(tmp_path, head)
    text = bench.markdown(report)
    assert "n/a" in text and "| m | 8 | fp32 | j0 | n/a | n/a | n/a |" in text
    write("step", quick=False)
    assert [d["part"] for d in bench.merge(tmp_path, head)["dropped_fragments"]] == ["step"]


def load_tables():
    return load_script("bench_tables", "tables.py")


def test_docs_benchmark_tables_are_generated_from_the_results():
    """docs/benchmarks.md holds exactly the tables that benchmarks/tables.py makes from the
    committed benchmarks/results/*.json (`python benchmarks/tables.py` rewrites them), and
    every results file has its section."""
    tables = load_tables()
    text = tables.DOC.read_text()
    assert tables.updated(text, tables.render()) == text, "run python benchmarks/tables.py"
    assert tables.main(["--check"]) == 0
    for path in tables.result_files(tables.RESULTS):
        assert f"#### `{path.name}`" in text, path.name


def test_docs_benchmark_tables_check_fails_on_a_stale_page(tmp_path, capsys):
    """--check exits 1, writing nothing, when a number in a results file changed since the
    page was made (or the page was edited by hand); without --check the page is rewritten
    and then passes."""
    tables = load_tables()
    results = tmp_path / "results"
    results.mkdir()
    for path in tables.result_files(tables.RESULTS):
        (results / path.name).write_text(path.read_text())
    doc = tmp_path / "benchmarks.md"
    doc.write_text(tables.DOC.read_text())
    assert tables.main(["--check", "--results", str(results), "--doc", str(doc)]) == 0

    step = results / "cpu_bs32_fp32.json"
    report = json.loads(step.read_text())
    report["results"][0]["lipexp_ms"] *= 3  # resnet34 j0: 100 ms -> 300 ms
    step.write_text(json.dumps(report))
    before = doc.read_text()
    assert tables.main(["--check", "--results", str(results), "--doc", str(doc)]) == 1
    assert doc.read_text() == before and "stale" in capsys.readouterr().err
    assert tables.main(["--results", str(results), "--doc", str(doc)]) == 0
    assert "| resnet34 | j0 | linear | 95 | 299 |" in doc.read_text()
    assert tables.main(["--check", "--results", str(results), "--doc", str(doc)]) == 0

    doc.write_text(doc.read_text().replace("| 299 |", "| 298 |", 1))  # a hand edit
    assert tables.main(["--check", "--results", str(results), "--doc", str(doc)]) == 1
