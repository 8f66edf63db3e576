"""GPU check (issue 20): every GPU goal of the README's "Speed" section measured in one
command, sized to fit 6 minutes on one H100 so that a failed part can be rerun alone
(``--only PART``) within the same machine loan (benchmarks/README.md).

On a fresh GPU machine with torch and Lightning but no network, lipexp's pure-Python
dependencies (Hydra, OmegaConf, torchattacks, ...) are installed from ``wheelhouse/``
(``make wheelhouse`` beforehand, where a registry is reachable) into a target folder put
on the path, if they are not importable. lipexp itself always runs from this source tree.
Parts, in order (seconds budgeted on one H100 in ``PARTS``):

- ``tests``: ``pytest -m "gpu and not slow"``, the cuda half of the ``device`` fixture's tests
  (~280; the slow ones, a cold inductor compile among them, are left to ``pytest -m gpu``), in
  pytest-xdist processes where pytest-xdist is importable, else serially (its own, longer
  budget). Test files that cannot be imported for want of a module the wheelhouse does not
  carry, wandb, are left out and named. On a CPU it only collects them (not-run: no CUDA).
- ``step``: benchmarks/step.py on the study's ResNet-34 and AllCNN, bs 128 and 512, bf16-mixed
  and fp32: J0, J2, J2-Lip2 exact, J2-Lip2 fd; lipexp's step against the hand-written one
  (median of interleaved paired ratios, goal <= 1.10) and J2-Lip2 fd against J0 (goal <= 2.0:
  on ResNet-34 hand-written steps interleaved on one network, paired; on AllCNN the ratio of
  lipexp's medians from the same rows, unpaired).
- ``compile``: ``+model.compile=true`` on ResNet-34 only, bs 128, bf16-mixed, J0 and J2-Lip2 fd
  (the exact penalty cannot be compiled; AllCNN, fp32 and bs 512 run uncompiled only): each
  graph costs tens of seconds to compile on a cold cache.
- ``epoch``: one J0 epoch of 50,000 synthetic CIFAR-shaped images through ``Trainer.fit`` with
  ``data.on_device=true`` (loader, uint8 -> float, augmentation) against the same number of
  steps on float batches already on the GPU (no loader); ratio compute / epoch, goal >= 0.95.
- ``eval``: lipexp's default evaluation (l2 + linf PGD) of 10,000 CIFAR-shaped images on
  ResNet-34 with random weights (benchmarks/eval.py's centred problem), goal <= 60 s.
- ``concurrent``: aggregate images/s of 1, 2 and 4 simultaneous J2-Lip2 fd trainings (ResNet-34,
  bs 128) on the one GPU, each over the same wall window: the lever for sweeps of small models.

Each part writes its fragment (``<out>/<stem>_parts/<part>.json``, stem ``gpu_check_<device>``
with ``_quick`` appended for ``--quick``) as soon as it ends, then the fragments present are
merged into ``<out>/<stem>.json`` and ``.md``: machine, versions, TF32 switches, each part's
numbers and seconds against its budget, and every goal's verdict (pass / fail / not-run, with
value and goal). ``--only`` keeps the other parts' fragments; a fragment of other sources
(``source_sha256``) or of the other size (``quick``) is dropped from the merge and named.
Exit status 1: the ``tests`` goal's verdict is fail, or a part run in this invocation raised;
an error recorded by an earlier invocation is reported (``stale_errors``), not counted.

    bash benchmarks/gpu_check.sh                          # all parts (make gpu-check)
    bash benchmarks/gpu_check.sh --only eval,concurrent   # rerun two parts
    python benchmarks/gpu_check.py --device cpu --quick   # dry run: every part, tiny sizes
"""

import argparse
import copy
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# lipexp's top-level imports that a bare GPU image lacks; the wheelhouse carries them
NEEDED = ("hydra", "omegaconf", "torchattacks")
# wanted, not needed: without them the tests part runs serially (TESTS_SERIAL_S)
OPTIONAL = ("xdist", "execnet")
SITE = Path(os.environ.get("LIPEXP_SITE", "/tmp/lipexp-site"))

PARTS = {  # name -> seconds budgeted on one H100 (cold caches). UNMEASURED ESTIMATES from
    # the sizes below, not timings; 345 s in all, plus ~15 s of start-up (imports, pip
    # install of the wheelhouse, machine and version records), within 6 minutes
    "tests": 65,  # one collection pass (~8 s), 8 xdist workers starting and collecting
    # (~15 s), ~280 small CUDA tests at ~1 s each over 8 processes (~35 s)
    "step": 80,  # 32 configurations x (3 + 12 step pairs, hand + lipexp) ~ 50 s of GPU work
    # (ResNet-34 bs 512 fp32 J2-Lip2 exact the largest, ~5 s), ~0.7 s of Trainer set-up each
    # (~22 s), 4 paired fd / J0 runs on ResNet-34 (~8 s)
    "compile": 70,  # 2 compiled configurations (ResNet-34): J0's graphs ~35-45 s cold, the
    # fd configuration's J2 gradient graphs ~20 s more (the forward graph cached), 15 pairs
    "epoch": 20,  # warm-ups of 10 steps, then (compute, epoch) x 2 of 390 steps, ~3 s each
    "eval": 65,  # the goal's 60 s and the random problem's set-up
    "concurrent": 45,  # 3 rounds: spawn + imports + build (~8 s), 3 warm-up steps and a 4 s
    # window
}
TESTS_SERIAL_S = 200  # the tests part without pytest-xdist: ~280 tests one after another
# (over the 6 minutes: carry pytest-xdist in the wheelhouse, `make wheelhouse` does)

FULL = {
    "step_models": ["resnet34", "allcnn"], "step_batch_sizes": [128, 512],
    "precisions": ["bf16", "32"], "defences": ["j0", "j2", "j2-lip2", "j2-lip2-fd"],
    "warmup": 3, "steps": 12, "test_paths": [],  # [] -> pytest's testpaths: tests/
    "versus_models": ["resnet34"],  # paired fd / J0 (hand-written); others: unpaired
    "compile_models": ["resnet34"], "compile_batch_size": 128, "compile_warmup": 3,
    "compile_precision": "bf16", "compile_defences": ["j0", "j2-lip2-fd"],
    "epoch_model": "resnet34", "epoch_batch_size": 128, "epoch_images": 50000,
    "epoch_precision": "bf16", "epoch_pairs": 2,
    "eval_model": "resnet34", "eval_images": 10000, "eval_batch_size": 1000,
    "concurrent_model": "resnet34", "concurrent_batch_size": 128,
    "concurrent_precision": "32", "concurrent_levels": [1, 2, 4], "concurrent_seconds": 4.0,
    "concurrent_warmup": 3,
}
QUICK = FULL | {  # the dry run: every part's code path, tiny sizes (seconds on 2 CPU cores)
    "step_models": ["small_cnn"], "step_batch_sizes": [8], "precisions": ["32"],
    "defences": ["j0", "j2-lip2-fd"], "warmup": 1, "steps": 2, "versus_models": ["small_cnn"],
    "test_paths": ["tests/test_speed_options.py"],  # one file: collecting all takes ~10 s
    "compile_models": ["small_cnn"], "compile_batch_size": 8, "compile_precision": "32",
    "compile_warmup": 1,
    "epoch_model": "small_cnn", "epoch_batch_size": 16, "epoch_images": 64,
    "epoch_precision": "32", "epoch_pairs": 1,
    "eval_model": "small_cnn", "eval_images": 2, "eval_batch_size": 2,
    "concurrent_model": "small_cnn", "concurrent_batch_size": 8, "concurrent_levels": [1, 2],
    "concurrent_seconds": 0.5, "concurrent_warmup": 1,
}


@dataclass(frozen=True)
class Goal:
    id: str
    part: str
    text: str
    op: str  # "<=", ">=" or "==" against target
    target: float


GOALS = [
    Goal("tests", "tests", "pytest -m 'gpu and not slow': failed + errors", "==", 0),
    Goal("step.lipexp_vs_hand", "step", "lipexp / hand-written step, every uncompiled "
         "configuration (worst median of paired ratios)", "<=", 1.10),
    Goal("step.fd_vs_j0", "step", "J2-Lip2 fd / J0, every uncompiled configuration (worst: "
         "median of paired hand-written ratios on ResNet-34, lipexp's medians on AllCNN)",
         "<=", 2.0),
    Goal("compile.lipexp_vs_hand", "compile", "lipexp / hand-written step, compiled (worst "
         "median of paired ratios)", "<=", 1.10),
    Goal("compile.fd_vs_j0", "compile", "J2-Lip2 fd / J0, compiled (worst ratio of lipexp's "
         "medians, unpaired)", "<=", 2.0),
    Goal("epoch.compute_over_epoch", "epoch", "compute only / J0 epoch with data.on_device=true "
         "(median of paired ratios)", ">=", 0.95),
    Goal("eval.seconds", "eval", "l2 + linf evaluation of 10,000 images on ResNet-34, seconds",
         "<=", 60.0),
]


def judge(value: float | None, op: str, target: float) -> str:
    if value is None:
        return "not-run"
    ok = {"<=": value <= target, ">=": value >= target, "==": value == target}[op]
    return "pass" if ok else "fail"


# ----------------------------------------------------------------- set-up


def _repo_index() -> int:
    """Where the source tree is on sys.path ('' counts as the working directory)."""
    for i, entry in enumerate(sys.path):
        try:
            if Path(entry or os.getcwd()).resolve() == REPO:
                return i
        except OSError:
            continue
    sys.path.insert(0, str(REPO))
    return 0


def ensure_dependencies(wheelhouse: Path) -> str:
    """Make lipexp's dependencies importable: as they are, from ``SITE`` (installed by an
    earlier call on this machine), or installed there now from the wheelhouse (no network,
    no dependency resolution: the wheelhouse is the list). pytest-xdist and execnet
    (``OPTIONAL``) are installed the same way where they are missing and the wheelhouse has
    them; without them the tests run serially. ``SITE`` goes on sys.path right after the
    source tree, and child processes (pytest, the concurrent workers) get the same order
    through PYTHONPATH, so that lipexp always runs from the tree (the wheel's copy in SITE
    gives only its metadata: the version)."""
    def missing(names) -> list[str]:
        importlib.invalidate_caches()
        return [m for m in names if importlib.util.find_spec(m) is None]

    need, want = missing(NEEDED), missing(OPTIONAL)
    wheels = sorted(wheelhouse.glob("*.whl"))
    optional_wheels = [w for w in wheels
                       if w.name.split("-")[0].lower() in ("pytest_xdist", "execnet")]
    if not need and (not want or not optional_wheels):
        return "present" + (f" (no {', '.join(want)}: the tests run serially)" if want else "")
    if need:
        names, chosen = NEEDED + OPTIONAL, wheels
    else:  # only pytest-xdist is wanted: the image's other packages stay as they are
        names, chosen = OPTIONAL, optional_wheels
    how = f"from {SITE} (installed earlier)"
    if not all((SITE / m).exists() for m in names if m in need + want):
        if not chosen:
            raise SystemExit(f"missing {', '.join(need)} and no wheels in {wheelhouse}: "
                             "run `make wheelhouse` where a package registry is reachable and "
                             "carry wheelhouse/ to this machine")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE),
                        *map(str, chosen)], check=True)
        how = f"{len(chosen)} wheels from {wheelhouse} into {SITE}"
    if str(SITE) not in sys.path:
        sys.path.insert(_repo_index() + 1, str(SITE))  # right after the source tree
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PATH"] = f"{SITE / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    if missing(NEEDED):
        raise SystemExit(f"still missing after installing the wheelhouse: {missing(NEEDED)}")
    left = missing(OPTIONAL)
    return how + (f" (no {', '.join(left)}: the tests run serially)" if left else "")


def xdist_available() -> bool:
    importlib.invalidate_caches()
    return all(importlib.util.find_spec(m) is not None for m in OPTIONAL)


def budgets(xdist: bool) -> dict:
    """Each part's budget (s, one H100): the tests part's depends on pytest-xdist."""
    return PARTS | ({} if xdist else {"tests": TESTS_SERIAL_S})


_BENCH: dict = {}


def bench(name: str):
    """benchmarks/<name>.py as a module (step.py, eval.py: their functions are reused)."""
    if name not in _BENCH:
        spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                      REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if name == "step":
            _memo_compose(module)
        _BENCH[name] = module
    return _BENCH[name]


def _memo_compose(step) -> None:
    """step.py's Hydra composition, once per configuration: run_one and run_versus compose
    the same (model, defence, batch size, precision) again; each caller gets its own copy."""
    original, cache = step.compose, {}

    def compose(model: str, defence: str, head: str, args):
        key = (model, defence, head, args.device, args.batch_size, args.precision,
               args.compile, args.channels_last)
        if key not in cache:
            cache[key] = original(model, defence, head, args)
        return copy.deepcopy(cache[key])

    step.compose = compose


def step_args(device: str, batch_size: int, precision: str, warmup: int, steps: int,
              compile: bool = False):
    """benchmarks/step.py's arguments (its own parser: defaults and checks stay its)."""
    return bench("step").parse(
        ["--device", device, "--batch-size", str(batch_size), "--precision", precision,
         "--warmup", str(warmup), "--steps", str(steps), "--data-steps", "0",
         *(["--compile"] if compile else [])])


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def machine_info(device: str) -> dict:
    from lipexp.runs.provenance import machine

    info = {"cpu": machine("cpu"), "cores": os.cpu_count(), "platform": platform.platform()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                 "multiprocessors": p.multi_processor_count,
                 "capability": f"{p.major}.{p.minor}", "driver": _driver()}
    return info


def versions() -> dict:
    import hydra
    import omegaconf
    import pytorch_lightning as pl
    import torchattacks

    from lipexp.runs.provenance import provenance

    prov = provenance()
    # the code's content, for a copy of the tree without its git history (commit null)
    digest = hashlib.sha256()
    for path in sorted((REPO / "lipexp").rglob("*.py")) + sorted(REPO.glob("benchmarks/*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + path.read_bytes())
    return {"python": prov["python"], "torch": prov["torch"], "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "pytorch_lightning": pl.__version__, "hydra": hydra.__version__,
            "omegaconf": omegaconf.__version__, "torchattacks": torchattacks.__version__,
            "lipexp": prov["lipexp"], "lipexp_commit": prov["lipexp_commit"],
            "source_sha256": digest.hexdigest()[:16], "executable": sys.executable,
            "tf32": tf32_flags()}


def tf32_flags() -> dict:
    """TensorFloat-32 switches as the measurements run. The check leaves torch's defaults
    (what a user's fp32 training gets): cuDNN convolutions in TF32 (allow_tf32 True),
    matmuls in full fp32 ("highest"); fp32 rows are labelled by ``prec``. lipexp's fd
    penalty passes and the hand-written step's turn TF32 off themselves."""
    return {"cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def prec(precision: str, device: str = "cuda") -> str:
    """A row's precision as measured: bf16-mixed, or fp32 with the TF32 parts named (CUDA)."""
    if precision != "32":
        return "bf16-mixed" if precision == "bf16" else str(precision)
    if device != "cuda":
        return "fp32"
    f = tf32_flags()
    tf32 = [what for what, on in (("convs", f["cudnn_allow_tf32"]),
                                  ("matmuls", f["cuda_matmul_allow_tf32"]
                                   or f["float32_matmul_precision"] != "highest")) if on]
    return f"fp32 (TF32 {' + '.join(tf32)})" if tf32 else "fp32 (no TF32)"


@contextmanager
def _quiet():
    """Warnings off inside a measurement (Lightning's and lipexp's notes on tiny data sets,
    compile's fd note); lipexp's own messages are tested elsewhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------- parts


TEST_MARKERS = "gpu and not slow"  # the slow ones (a cold inductor compile): pytest -m gpu


def part_tests(ctx) -> dict:
    """``pytest -m "gpu and not slow"`` in a child process; first a collection pass, which
    finds the test files that cannot be imported here for want of a module (wandb is binary
    and big: the wheelhouse does not carry it), to leave out by name rather than fail the run
    on them. pytest-xdist's processes where it is importable, else serially."""
    base = [sys.executable, "-m", "pytest", "-m", TEST_MARKERS, "-p", "no:cacheprovider",
            *ctx.s["test_paths"]]
    env = os.environ | {"WANDB_MODE": "disabled"}

    def pytest(*extra: str, timeout: float) -> str:
        # its own process group: past the timeout, pytest-xdist's workers go with it
        with subprocess.Popen([*base, *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) as p:
            try:
                return p.communicate(timeout=timeout)[0]
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                raise RuntimeError(f"pytest ran past {timeout} s: "
                                   f"{p.communicate()[0][-2000:]}") from None

    out = pytest("--collect-only", "-q", timeout=300)
    ignored = {}  # test file -> the missing module (never lipexp's own: that is an error)
    blocks = re.split(r"^_+ ERROR collecting (\S+) _+$", out, flags=re.M)
    for path, text in zip(blocks[1::2], blocks[2::2]):
        missing = re.search(r"ModuleNotFoundError: No module named '([^'.]+)", text)
        if missing and missing[1] not in ("lipexp", "tests"):
            ignored[path] = missing[1]
    ignores = [f"--ignore={path}" for path in ignored]
    if ignored:
        out = pytest("--collect-only", "-q", *ignores, timeout=300)
    found = re.search(r"(\d+)(?:/\d+)? tests? collected", out)
    xdist = ctx.test_workers > 1 and xdist_available()
    result = {"markers": TEST_MARKERS, "collected": int(found[1]) if found else 0,
              "ignored_files": ignored, "xdist_workers": ctx.test_workers if xdist else 0,
              "runner": (f"pytest-xdist, {ctx.test_workers} processes" if xdist else
                         f"serial (no pytest-xdist: budget {TESTS_SERIAL_S} s)"),
              "collection_errors": re.findall(r"^ERROR (\S+)", out, re.M)}
    ctx.log(f"tests: {result['collected']} collected ({TEST_MARKERS}); "
            + (result["runner"] if ctx.device == "cuda" else "not run: no CUDA device"))
    left_out = "".join(f"; left out: {path} (no {module})" for path, module in ignored.items())
    if ctx.device != "cuda":
        return result | {"goals": {"tests": {"value": None, "detail": (
            f"{result['collected']} CUDA tests collected; not run: no CUDA device{left_out}")}}}
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "junit.xml"
        # pytest-xdist (the image's or the wheelhouse's) runs the small tests side by side
        # on the one GPU
        workers = ["-n", str(ctx.test_workers)] if xdist else []
        out = pytest("-q", *workers, *ignores, f"--junitxml={xml_path}",
                     timeout=3 * ctx.budgets["tests"])
        counts = {k: 0 for k in ("tests", "failures", "errors", "skipped")}
        if xml_path.exists():
            root = ET.parse(xml_path).getroot()
            for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
                for k in counts:
                    counts[k] += int(suite.get(k, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    bad = counts["failures"] + counts["errors"]
    result |= counts | {"passed": passed,
                        "output_tail": out[-3000:] if bad or not passed else out[-300:]}
    detail = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
              f"{counts['skipped']} skipped{left_out}")
    # a run in which no test passed (none collected, all skipped) is no pass
    return result | {"goals": {"tests": {"value": bad, "detail": detail,
                                         "verdict": "pass" if passed and not bad else "fail"}}}


def _step_rows(ctx, models, batch_sizes, precisions, defences, compile: bool,
               versus_models=(), warmup: int | None = None):
    step = bench("step")
    rows, versus = [], []
    warmup = ctx.s["warmup"] if warmup is None else warmup
    for model in models:
        for precision in precisions:
            for bs in batch_sizes:
                args = step_args(ctx.device, bs, precision, warmup, ctx.s["steps"], compile)
                where = {"batch_size": bs, "precision": precision,
                         "precision_label": prec(precision, ctx.device), "compile": compile}
                for defence in defences:
                    t0 = time.perf_counter()
                    with _quiet():
                        r = step.run_one(model, defence, "linear", args) | where
                    rows.append(r)
                    ctx.log(f"{model} bs {bs} {where['precision_label']}"
                            f"{' compiled' if compile else ''} {defence}: hand "
                            f"{_num(r['hand_ms'], '.1f')} ms, lipexp {_num(r['lipexp_ms'], '.1f')}"
                            f" ms, ratio {_num(r['ratio_median'], '.3f')} "
                            f"({time.perf_counter() - t0:.1f} s)")
                if model in versus_models and {"j0", "j2-lip2-fd"} <= set(defences):
                    with _quiet():
                        (v,) = step.run_versus(model, [("j2-lip2-fd", "j0")], "linear", args)
                    versus.append(v | where)
                    ctx.log(f"{model} bs {bs} {where['precision_label']}: j2-lip2-fd / j0 = "
                            f"{_num(v['ratio_median'], '.3f')} (paired)")
    return rows, versus


def _worst(items: list[dict], key: str = "ratio_median") -> dict | None:
    """The largest finite value of ``key`` (None: none finite)."""
    finite = [r for r in items if _finite(r.get(key))]
    return max(finite, key=lambda r: r[key]) if finite else None


def _fd_over_j0(rows: list[dict], versus: list[dict]) -> list[dict]:
    """J2-Lip2 fd / J0 per (model, bs, precision): the paired hand-written ratio where
    measured, else the ratio of lipexp's medians from the rows (unpaired)."""
    paired = {(v["model"], v["batch_size"], v["precision"]): v for v in versus}
    by = {(r["model"], r["batch_size"], r["precision"], r["defence"]): r for r in rows}
    out = []
    for (model, bs, precision, defence), r in by.items():
        if defence != "j0" or (model, bs, precision, "j2-lip2-fd") not in by:
            continue
        where = {"model": model, "batch_size": bs, "precision": precision,
                 "precision_label": r.get("precision_label")}
        v = paired.get((model, bs, precision))
        if v is not None:
            out.append(where | {"ratio": v["ratio_median"], "kind": "paired, hand-written"})
        else:
            fd = by[model, bs, precision, "j2-lip2-fd"]["lipexp_ms"]
            j0 = r["lipexp_ms"]
            out.append(where | {"ratio": fd / j0 if _finite(fd) and _finite(j0) and j0
                                else None, "kind": "unpaired, lipexp's medians"})
    return out


def part_step(ctx) -> dict:
    s = ctx.s
    rows, versus = _step_rows(ctx, s["step_models"], s["step_batch_sizes"], s["precisions"],
                              s["defences"], compile=False, versus_models=s["versus_models"])
    worst = _worst(rows)
    fd_rows = _fd_over_j0(rows, versus)
    fd = _worst(fd_rows, "ratio")
    within = sum(_finite(r["ratio_median"]) and r["ratio_median"] <= 1.10 for r in rows)
    return {"rows": rows, "versus": versus, "fd_over_j0": fd_rows, "goals": {
        "step.lipexp_vs_hand": {"value": worst and worst["ratio_median"], "detail": worst and (
            f"worst: {worst['model']} {worst['defence']} bs {worst['batch_size']} "
            f"{worst['precision_label']}; {within}/{len(rows)} configurations within")},
        "step.fd_vs_j0": {"value": fd and fd["ratio"], "detail": fd and (
            f"worst: {fd['model']} bs {fd['batch_size']} {fd['precision_label']} "
            f"({fd['kind']}); paired on {', '.join(s['versus_models']) or 'none'}, "
            f"{len(fd_rows)} configurations")}}}


def part_compile(ctx) -> dict:
    """The compiled subset. In the CPU dry run TorchDynamo is disabled (torch.compile then
    returns a wrapper that runs eagerly): the code path, not inductor's minutes of C++."""
    s = ctx.s
    dry = ctx.device != "cuda"
    saved = torch._dynamo.config.disable
    torch._dynamo.config.disable = dry or saved
    try:
        rows, _ = _step_rows(ctx, s["compile_models"], [s["compile_batch_size"]],
                             [s["compile_precision"]], s["compile_defences"], compile=True,
                             warmup=s["compile_warmup"])
    finally:
        torch._dynamo.config.disable = saved
    worst = _worst(rows)
    fd_rows = _fd_over_j0(rows, [])
    fd = _worst(fd_rows, "ratio")
    return {"rows": rows, "fd_over_j0": fd_rows, "dynamo_disabled": dry, "note": (
        f"compiled: {', '.join(s['compile_models'])}, bs {s['compile_batch_size']}, "
        f"{prec(s['compile_precision'], ctx.device)}, {', '.join(s['compile_defences'])} "
        f"({s['compile_warmup']} warm-up steps, the compilation among them); the exact "
        "penalty cannot be compiled, and with fd only the J2 gradient is compiled, the "
        "penalty's passes run uncompiled") + ("; dry run: TorchDynamo disabled" if dry else ""),
        "goals": {
        "compile.lipexp_vs_hand": {"value": worst and worst["ratio_median"],
                                   "detail": worst and f"worst: {worst['model']} "
                                   f"{worst['defence']}"},
        "compile.fd_vs_j0": {"value": fd and fd["ratio"], "detail": fd and (
            f"worst: {fd['model']} ({fd['kind']})")}}}


class Batches:
    """Float batches already on the device, handed to Trainer.fit as they are (no loader)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def part_epoch(ctx) -> dict:
    from hydra.utils import instantiate

    from lipexp.data.datamodule import to_unit
    from lipexp.data.sources import ImageArrays
    from lipexp.runs.build import build_module

    step, s = bench("step"), ctx.s
    pl = step._pl()
    model, bs, n = s["epoch_model"], s["epoch_batch_size"], s["epoch_images"]
    on_device = ctx.device == "cuda"  # refused without a GPU: the dry run keeps it on the host
    device, shape = torch.device(ctx.device), step.MODELS[model][2]
    clock = step.Clock(device)
    args = step_args(ctx.device, bs, s["epoch_precision"], 0, 0)
    pl.seed_everything(0, verbose=False)
    cfg = step.compose(model, "j0", "linear", args)
    with _quiet():
        module = build_module(cfg)
    arrays = ImageArrays(*step.synthetic(shape, n), *step.synthetic(shape, 16, seed=1))
    dm = instantiate(cfg.data, source=lambda data_dir, download: arrays, download=False,
                     on_device=on_device)
    steps = n // bs  # the data module drops the last, smaller batch
    xc, yc = step.synthetic(shape, steps * bs, seed=2)
    xc, yc = to_unit(xc).to(device), yc.to(device)
    compute = Batches([(xc[i * bs:(i + 1) * bs], yc[i * bs:(i + 1) * bs]) for i in range(steps)])

    class EpochTimer(pl.Callback):
        """Wall seconds of each epoch, the device synchronized at its start and end."""

        def __init__(self) -> None:
            self.seconds, self.steps = [], 0

        def on_train_epoch_start(self, trainer, module):
            self.steps, self.t0 = 0, clock()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.steps += 1

        def on_train_epoch_end(self, trainer, module):
            self.seconds.append(clock() - self.t0)

    def epoch(max_steps: int = -1, **data) -> tuple[float, int]:
        timer = EpochTimer()
        with _quiet():
            step.trainer_for(cfg, max_steps, [timer]).fit(module, **data)
        return timer.seconds[-1] if timer.seconds else float("nan"), timer.steps

    warm = min(10, steps)  # kernels chosen, the training split moved to the GPU (setup)
    epoch(warm, datamodule=dm)
    epoch(warm, train_dataloaders=compute)
    pairs = []
    for _ in range(s["epoch_pairs"]):  # interleaved: compute, epoch, compute, epoch
        (tc, nc), (te, ne) = epoch(train_dataloaders=compute), epoch(datamodule=dm)
        pairs.append({"compute_s": tc, "epoch_s": te, "ratio": tc / te, "steps": [nc, ne]})
        ctx.log(f"{model} J0 bs {bs}: compute {tc:.2f} s, epoch {te:.2f} s ({nc}/{ne} steps)")
    ratio = statistics.median(p["ratio"] for p in pairs)
    return {"model": model, "batch_size": bs, "images": n, "steps": steps,
            "precision": s["epoch_precision"],
            "precision_label": prec(s["epoch_precision"], ctx.device), "on_device": on_device,
            "pairs": pairs,
            "ratio_median": ratio,
            "epoch_images_per_s": steps * bs / statistics.median(p["epoch_s"] for p in pairs),
            "goals": {"epoch.compute_over_epoch": {"value": ratio, "detail": (
                f"{model} bs {bs} {prec(s['epoch_precision'], ctx.device)}, {steps} steps, "
                f"data.on_device={str(on_device).lower()}")}}}


def part_eval(ctx) -> dict:
    ev, s = bench("eval"), ctx.s
    model, n = s["eval_model"], s["eval_images"]
    args = ev.parse(["--device", ctx.device, "--batch-size", str(s["eval_batch_size"]),
                     *(["--bf16"] if ctx.eval_bf16 else [])])
    clock = bench("step").Clock(torch.device(ctx.device))
    t0 = clock()
    with _quiet():
        net, x, y = ev.random_problem(model, n, torch.device(ctx.device))
    t1 = clock()
    with _quiet():
        rows = ev.run_one(net, x, y, "default", args)
    seconds = clock() - t1
    ctx.log(f"{model}: {n} images, l2 + linf in {seconds:.1f} s (set-up {t1 - t0:.1f} s)")
    return {"model": model, "images": n, "batch_size": s["eval_batch_size"],
            "bf16": ctx.eval_bf16, "weights": "random weights, centred on random smooth images",
            "setup_s": t1 - t0, "seconds": seconds, "attacks": rows,
            "goals": {"eval.seconds": {"value": seconds, "detail": (
                f"{model}, {n} images, batch {s['eval_batch_size']}, "
                f"{'bf16' if ctx.eval_bf16 else 'fp32'}, random weights")}}}


def _concurrent_worker(spec: dict, barrier, queue) -> None:
    """One J2-Lip2 fd training (lipexp's step in Trainer.fit, batches drawn from a small
    on-device set): warm-up steps, the barrier (every worker ready), then steps for
    ``seconds``; puts its images/s over that window."""
    try:
        from torch.utils.data import DataLoader, RandomSampler

        from lipexp.data.datamodule import InMemoryImages, keep_batch, to_unit
        from lipexp.runs.build import build_module

        torch.set_num_threads(spec["threads"])
        step = bench("step")
        pl = step._pl()
        pl.seed_everything(spec["rank"], verbose=False)
        bs, warmup, device = spec["batch_size"], spec["warmup"], torch.device(spec["device"])
        clock = step.Clock(device)
        cfg = step.compose(spec["model"], "j2-lip2-fd", "linear",
                           step_args(spec["device"], bs, spec["precision"], 0, 0))
        with _quiet():
            module = build_module(cfg)
        x, y = step.synthetic(step.MODELS[spec["model"]][2], 8 * bs, seed=spec["rank"])
        data = InMemoryImages(to_unit(x).to(device), y.to(device))
        loader = DataLoader(data, batch_size=bs, drop_last=True, collate_fn=keep_batch,
                            sampler=RandomSampler(data, replacement=True,
                                                  num_samples=bs * 10**6))
        window = {}

        class Window(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == warmup:
                    clock()
                    barrier.wait(timeout=300)
                    window.update(t0=time.perf_counter(), wall0=time.time(), images=0)

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                # no synchronization per step (the GPU queue stays full, as in training);
                # at the end every issued step is waited for
                if batch_idx >= warmup:
                    window["images"] += len(batch[1])
                    if time.perf_counter() - window["t0"] >= spec["seconds"]:
                        window.update(seconds=clock() - window["t0"], wall1=time.time())
                        trainer.should_stop = True

        with _quiet():
            step.trainer_for(cfg, -1, [Window()]).fit(module, train_dataloaders=loader)
        queue.put({"rank": spec["rank"], **window,
                   "images_per_s": window["images"] / window["seconds"]})
    except BaseException as e:  # the others must not wait at the barrier for this one
        barrier.abort()
        queue.put({"rank": spec["rank"], "error": f"{type(e).__name__}: {e}"})


def part_concurrent(ctx) -> dict:
    """Rounds of N workers started together. CUDA: spawned processes (each its own CUDA
    context; forking a process that has used CUDA is not allowed). CPU (the dry run): forked,
    which skips each worker's imports."""
    import multiprocessing as mp
    from queue import Empty

    s = ctx.s
    mp_ctx = mp.get_context("spawn" if ctx.device == "cuda" else "fork")
    if ctx.device == "cuda":
        torch.cuda.empty_cache()  # the earlier parts' cached blocks, for the workers
    rounds = []
    for n in s["concurrent_levels"]:
        t0 = time.perf_counter()
        barrier, queue = mp_ctx.Barrier(n), mp_ctx.Queue()
        spec = {"model": s["concurrent_model"], "batch_size": s["concurrent_batch_size"],
                "precision": s["concurrent_precision"], "device": ctx.device,
                "warmup": s["concurrent_warmup"], "seconds": s["concurrent_seconds"],
                "threads": 1 if ctx.device == "cpu" else max(1, (os.cpu_count() or 2) // (2 * n))}
        procs = [mp_ctx.Process(target=_concurrent_worker, args=(spec | {"rank": i}, barrier,
                                                                 queue)) for i in range(n)]
        for p in procs:
            p.start()
        results = []
        try:
            for _ in procs:
                results.append(queue.get(timeout=300 + s["concurrent_seconds"]))
        except Empty:
            results.append({"error": "a worker gave no result within 300 s"})
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"{n} concurrent runs: {'; '.join(errors)}")
        overlap = min(r["wall1"] for r in results) - max(r["wall0"] for r in results)
        total = sum(r["images_per_s"] for r in results)
        rounds.append({"processes": n, "aggregate_images_per_s": total,
                       "per_process_images_per_s": [r["images_per_s"] for r in results],
                       "window_s": statistics.mean(r["seconds"] for r in results),
                       "window_overlap_s": overlap, "round_s": time.perf_counter() - t0})
        ctx.log(f"{n} x J2-Lip2 fd {s['concurrent_model']} bs {s['concurrent_batch_size']}: "
                f"{total:,.0f} images/s together ({time.perf_counter() - t0:.1f} s)")
    base = rounds[0]["aggregate_images_per_s"]
    for r in rounds:
        r["speedup"] = r["aggregate_images_per_s"] / base
    return {"model": s["concurrent_model"], "batch_size": s["concurrent_batch_size"],
            "precision": s["concurrent_precision"],
            "precision_label": prec(s["concurrent_precision"], ctx.device),
            "defence": "j2-lip2-fd", "rounds": rounds,
            "goals": {}}


PART_FUNCTIONS = {"tests": part_tests, "step": part_step, "compile": part_compile,
                  "epoch": part_epoch, "eval": part_eval, "concurrent": part_concurrent}


# ----------------------------------------------------------------- report


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _num(value, spec: str = ".3g") -> str:
    """A number for the report; "n/a" for None, NaN and anything not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _f(value, digits: int = 3) -> str:
    return _num(value, f".{digits}g") if isinstance(value, float) or value is None \
        else str(value)


def _p(row: dict) -> str:
    """A row's precision label (recorded since the TF32 labels; older fragments: the name)."""
    return str(row.get("precision_label") or {"32": "fp32", "bf16": "bf16-mixed"}.get(
        row.get("precision"), row.get("precision")))


def _fragment_problem(fragment, head: dict) -> str | None:
    """Why a fragment on disk does not belong to this run's report (None: it does)."""
    if not isinstance(fragment, dict) or "status" not in fragment:
        return "not a fragment"
    if fragment.get("quick") != head["quick"]:
        return f"quick={fragment.get('quick')}, this run quick={head['quick']}"
    if fragment.get("source_sha256") != head["versions"]["source_sha256"]:
        return (f"sources {fragment.get('source_sha256')}, this run's "
                f"{head['versions']['source_sha256']}")
    return None


def merge(parts_dir: Path, head: dict, ran: dict | None = None) -> dict:
    """The report from the fragments present that match this run's header (same ``quick``,
    same ``source_sha256``; others are dropped and named): each part's, and every goal's
    verdict. ``ran``: part -> status of the parts run by this invocation so far."""
    ran = ran or {}
    parts, dropped = {}, []
    for name in PARTS:
        path = parts_dir / f"{name}.json"
        fragment, problem = None, None
        if path.exists():
            try:
                fragment = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                problem = f"unreadable: {type(e).__name__}: {e}"[:200]
            else:
                problem = _fragment_problem(fragment, head)
        if problem:
            dropped.append({"part": name, "path": str(path), "why": problem})
            fragment = None
        parts[name] = fragment if fragment is not None else {"status": "not-run"}
    goals = []
    for g in GOALS:
        part = parts[g.part]
        got = part.get("goals", {}).get(g.id, {}) if part["status"] == "ok" else {}
        value = got.get("value")
        value = value if _finite(value) else None
        detail = got.get("detail") or (f"part {g.part}: {part['status']}"
                                       + (f" ({part['error_line']})" if "error_line" in part
                                          else ""))
        goals.append({"id": g.id, "part": g.part, "goal": f"{g.op} {g.target:g}",
                      "text": g.text, "value": value,
                      "verdict": got.get("verdict") or judge(value, g.op, g.target),
                      "detail": detail})
    errors_now = [n for n, status in ran.items() if status == "error"]
    stale = [n for n, p in parts.items() if p["status"] == "error" and n not in ran]
    tests_verdict = next(g["verdict"] for g in goals if g["id"] == "tests")
    return head | {
        "parts": parts, "goals": goals, "dropped_fragments": dropped,
        "errors_this_run": errors_now, "stale_errors": stale,
        "exit_status": 1 if errors_now or tests_verdict == "fail" else 0,
        "seconds": sum(p.get("seconds", 0) for p in parts.values()
                       if _finite(p.get("seconds")))}


def markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    t = v.get("tf32") or {}
    lines = [f"# GPU check: {m.get('gpu', m.get('cpu'))} ({report['device']})", ""]
    if report["quick"]:
        lines += ["**Dry run** (`--quick`): tiny sizes; the numbers are not measurements of "
                  "the goals.", ""]
    lines += [f"{report['date']}; lipexp {v.get('lipexp')} (commit {v.get('lipexp_commit')}, "
              f"source {v.get('source_sha256')}); python {v.get('python')}, torch "
              f"{v.get('torch')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, Lightning "
              f"{v.get('pytorch_lightning')}; driver {m.get('driver')}; CPU {m.get('cpu')}.", "",
              f"TF32 (torch's defaults, left as they are): cudnn.allow_tf32 "
              f"{t.get('cudnn_allow_tf32')}, cuda.matmul.allow_tf32 "
              f"{t.get('cuda_matmul_allow_tf32')}, float32_matmul_precision "
              f"{t.get('float32_matmul_precision')}; fp32 rows are labelled with the TF32 parts "
              "they ran with (lipexp's fd penalty and the hand-written step's turn TF32 off).",
              "", f"Exit status {report.get('exit_status')}: errors in this run: "
              f"{', '.join(report.get('errors_this_run', [])) or 'none'}; stale errors (earlier "
              "runs' fragments, not counted): "
              f"{', '.join(report.get('stale_errors', [])) or 'none'}"
              + "".join(f"; dropped fragment {d['part']} ({d['why']})"
                        for d in report.get("dropped_fragments", [])) + ".", "",
              "| part | goal | measured | goal | verdict | detail |",
              "| --- | --- | ---: | --- | --- | --- |"]
    for g in report["goals"]:
        lines.append(f"| {g['part']} | {g['text']} | {_f(g['value'])} | {g['goal']} | "
                     f"**{g['verdict']}** | {g['detail'] or ''} |")
    budgets = report.get("budgets", PARTS)
    lines += ["", "| part | status | seconds | budget (H100, estimate) | run |",
              "| --- | --- | ---: | ---: | --- |"]
    for name, p in report["parts"].items():
        over = _finite(p.get("seconds")) and p["seconds"] > p.get("budget_s", budgets[name])
        lines.append(f"| {name} | {p['status']} | {_num(p.get('seconds'), '.1f')}"
                     f"{' (over)' if over else ''} | {p.get('budget_s', budgets[name])} | "
                     f"{p.get('date', '-')} |")
        if p["status"] == "error":
            lines.append(f"| | `{p.get('error_line')}` | | | |")
    parts = report["parts"]
    for name in ("step", "compile"):
        if parts[name]["status"] != "ok":
            continue
        lines += ["", f"## {name}", "", "| model | bs | precision | defence | hand ms | "
                  "lipexp ms | lipexp / hand |", "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
        for r in parts[name].get("rows", []):
            lines.append(f"| {r.get('model')} | {r.get('batch_size')} | {_p(r)} | "
                         f"{r.get('defence')} | {_num(r.get('hand_ms'), '.2f')} | "
                         f"{_num(r.get('lipexp_ms'), '.2f')} | "
                         f"{_num(r.get('ratio_median'), '.3f')} |")
        for r in parts[name].get("fd_over_j0", []):
            lines.append(f"\n{r.get('model')} bs {r.get('batch_size')} {_p(r)}: J2-Lip2 fd / "
                         f"J0 = {_num(r.get('ratio'), '.3f')} ({r.get('kind')})")
        for r in parts[name].get("versus", []):
            lines.append(f"\n{r.get('model')} bs {r.get('batch_size')} {_p(r)}, the paired "
                         f"run (hand-written, interleaved): {r.get('a')} "
                         f"{_num(r.get('a_ms'), '.2f')} ms, {r.get('b')} "
                         f"{_num(r.get('b_ms'), '.2f')} ms")
        if "note" in parts[name]:
            lines.append(f"\n{parts[name]['note']}")
    if parts["epoch"]["status"] == "ok":
        e = parts["epoch"]
        lines += ["", "## epoch", "", f"{e.get('model')} J0, bs {e.get('batch_size')}, "
                  f"{_p(e)}, {e.get('steps')} steps, "
                  f"data.on_device={str(e.get('on_device')).lower()}: "
                  + "; ".join(f"compute {_num(p.get('compute_s'), '.2f')} s / epoch "
                              f"{_num(p.get('epoch_s'), '.2f')} s" for p in e.get("pairs", []))
                  + f"; {_num(e.get('epoch_images_per_s'), ',.0f')} images/s end to end"]
    if parts["eval"]["status"] == "ok":
        e = parts["eval"]
        lines += ["", "## eval", "", f"{e.get('model')}, {e.get('images')} images "
                  f"({e.get('weights')}), batch {e.get('batch_size')}, "
                  f"{'bf16' if e.get('bf16') else 'fp32'}: {_num(e.get('seconds'), '.1f')} s "
                  f"(set-up {_num(e.get('setup_s'), '.1f')} s); "
                  + "; ".join(f"{a.get('attack')} {_num(a.get('seconds'), '.1f')} s, "
                              f"{_num(a.get('forward_per_image'), '.0f')} forward passes per image"
                              for a in e.get("attacks", []))]
    if parts["concurrent"]["status"] == "ok":
        c = parts["concurrent"]
        lines += ["", "## concurrent", "", f"{c.get('defence')} {c.get('model')} bs "
                  f"{c.get('batch_size')} {_p(c)}, one GPU:", "",
                  "| processes | images/s together | x 1 process | each |",
                  "| ---: | ---: | ---: | --- |"]
        for r in c.get("rounds", []):
            each = ", ".join(_num(x, ",.0f") for x in r.get("per_process_images_per_s", []))
            lines.append(f"| {r.get('processes')} | {_num(r.get('aggregate_images_per_s'), ',.0f')}"
                         f" | {_num(r.get('speedup'), '.2f')} | {each} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, stem: str, report: dict, write_json_atomic) -> None:
    """The merged JSON, then its Markdown (a formatting failure there leaves the JSON and a
    Markdown naming the failure: the next part still runs)."""
    write_json_atomic(out / f"{stem}.json", report)
    try:
        text = markdown(report)
    except Exception as e:  # the report must not stop the check
        text = (f"# GPU check ({report.get('device')})\n\nMarkdown failed: "
                f"{type(e).__name__}: {e}; see {stem}.json\n")
    (out / f"{stem}.md").write_text(text)
# ----------------------------------------------------------------- main


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes: the dry run")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of {list(PARTS)}"
                   " (the other parts' fragments are kept)")
    p.add_argument("--steps", type=int, default=None, help="timed step pairs (step, compile)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU "
                   "(default: torch's)")
    p.add_argument("--test-workers", type=int, default=8,
                   help="pytest-xdist processes for the tests part, where installed (1: none)")
    p.add_argument("--eval-bf16", action="store_true", help="the evaluation under bf16 autocast")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="folder of gpu_check_<device>.json/.md and the fragments")
    p.add_argument("--wheelhouse", default=str(REPO / "wheelhouse"))
    args = p.parse_args(argv)
    args.parts = [x for x in args.only.split(",") if x]
    unknown = set(args.parts) - set(PARTS)
    if unknown or not args.parts:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}; of {', '.join(PARTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device (--device cpu --quick for the dry run)")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    installed = ensure_dependencies(Path(args.wheelhouse))
    os.environ.setdefault("WANDB_MODE", "disabled")
    from lipexp.files import write_json_atomic

    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    args.s = dict(QUICK if args.quick else FULL)
    if args.steps:
        args.s["steps"] = args.steps
    args.budgets = budgets(args.test_workers > 1 and xdist_available())
    args.log = lambda msg: print(f"[gpu_check {time.perf_counter() - start:6.1f} s] {msg}",
                                 flush=True)
    out = Path(args.out)
    stem = f"gpu_check_{args.device}{'_quick' if args.quick else ''}"
    parts_dir = out / f"{stem}_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    if set(args.parts) == set(PARTS):  # a whole run: no fragment of an earlier one stays
        for old in parts_dir.glob("*.json"):
            old.unlink()
    head = {"device": args.device, "quick": args.quick, "machine": machine_info(args.device),
            "versions": versions(), "dependencies": installed, "budgets": args.budgets,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": sys.argv}
    args.log(f"{head['machine'].get('gpu', head['machine']['cpu'])}; dependencies: {installed};"
             f" TF32 {head['versions']['tf32']}; parts {', '.join(args.parts)}")
    ran, report = {}, merge(parts_dir, head)
    for name in PARTS:
        if name not in args.parts:
            continue
        budget = args.budgets[name]
        args.log(f"part {name} (budget {budget} s on one H100, an unmeasured estimate)")
        t0 = time.perf_counter()
        try:
            fragment = {"status": "ok", **PART_FUNCTIONS[name](args)}
        except Exception as e:  # recorded; the next part still runs
            fragment = {"status": "error", "error_line": f"{type(e).__name__}: {e}"[:300],
                        "error": traceback.format_exc()[-4000:]}
            args.log(f"part {name} failed: {fragment['error']}")
        seconds = time.perf_counter() - t0
        fragment |= {"seconds": seconds, "budget_s": budget, "over_budget": seconds > budget,
                     "quick": args.quick, "date": head["date"],
                     "source_sha256": head["versions"]["source_sha256"]}
        ran[name] = fragment["status"]
        try:  # a report that cannot be written or merged must not stop the next part
            write_json_atomic(parts_dir / f"{name}.json", fragment)
            report = merge(parts_dir, head, ran)  # after every part: a crash loses nothing
            write_report(out, stem, report, write_json_atomic)
        except Exception as e:
            ran[name] = "error"
            args.log(f"part {name}: its fragment or the report failed: {type(e).__name__}: {e}")
        args.log(f"part {name}: {fragment['status']} in {seconds:.1f} s of a {budget} s budget"
                 + (f" -- WARNING: over budget by {seconds - budget:.1f} s"
                    if seconds > budget else ""))
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report = merge(parts_dir, head, ran)
    write_report(out, stem, report, write_json_atomic)
    print("      part: status, seconds / budget (H100 estimates)")
    for name, p in report["parts"].items():
        budget = p.get("budget_s", args.budgets[name])
        over = _finite(p.get("seconds")) and p["seconds"] > budget
        when = "this run" if name in ran else ("earlier run" if p["status"] != "not-run" else "")
        print(f"{name:>10}: {p['status']}, {_num(p.get('seconds'), '.1f')} s / {budget} s"
              + (" OVER BUDGET" if over else "") + (f" ({when})" if when else ""))
    for g in report["goals"]:
        print(f"{g['verdict']:>10}: {g['text']}: {_f(g['value'])} (goal {g['goal']})")
    for d in report["dropped_fragments"]:
        print(f"   dropped: fragment {d['path']} ({d['why']}): not merged")
    if report["stale_errors"]:
        print(f"     stale: errors recorded by earlier runs, not in the exit status: "
              f"{', '.join(report['stale_errors'])} (rerun with --only)")
    total = sum(p["seconds"] for n, p in report["parts"].items()
                if n in ran and _finite(p.get("seconds")))
    args.log(f"written: {out / f'{stem}.json'} and .md; this run's parts {total:.1f} s "
             f"(budgets: {sum(args.budgets.values())} s in all on one H100); exit status "
             f"{report['exit_status']} (errors this run: "
             f"{', '.join(report['errors_this_run']) or 'none'}; tests verdict "
             f"{report['goals'][0]['verdict']})")
    return report


if __name__ == "__main__":
    sys.exit(main()["exit_status"])
