"""GPU check (issue 20): every GPU goal of the README's "Speed" section measured in one
command, sized to fit 6 minutes on one H100 so that a failed part can be rerun alone
(``--only PART``) within the same machine loan (benchmarks/README.md).

On a fresh GPU machine with torch and Lightning but no network, lipexp's pure-Python
dependencies (Hydra, OmegaConf, torchattacks, ...) are installed from ``wheelhouse/``
(``make wheelhouse`` beforehand, where a registry is reachable) into a target folder put
on the path, if they are not importable. lipexp itself always runs from this source tree.
Parts, in order (seconds budgeted on one H100 in ``PARTS``):

- ``tests``: ``pytest -m gpu``, the cuda half of the ``device`` fixture's tests (test files
  that cannot be imported for want of a module the wheelhouse does not carry, wandb, are
  left out and named). On a CPU it only collects them (not-run: no CUDA).
- ``step``: benchmarks/step.py on the study's ResNet-34 and AllCNN, bs 128 and 512, bf16-mixed
  and fp32: J0, J2, J2-Lip2 exact, J2-Lip2 fd; lipexp's step against the hand-written one
  (median of interleaved paired ratios, goal <= 1.10) and J2-Lip2 fd against J0 (hand-written
  steps interleaved on one network, goal <= 2.0).
- ``compile``: the same with ``+model.compile=true`` on a subset (bs 128, bf16, J0 and J2-Lip2
  fd; the exact penalty cannot be compiled): compiling costs tens of seconds per graph.
- ``epoch``: one J0 epoch of 50,000 synthetic CIFAR-shaped images through ``Trainer.fit`` with
  ``data.on_device=true`` (loader, uint8 -> float, augmentation) against the same number of
  steps on float batches already on the GPU (no loader); ratio compute / epoch, goal >= 0.95.
- ``eval``: lipexp's default evaluation (l2 + linf PGD) of 10,000 CIFAR-shaped images on
  ResNet-34 with random weights (benchmarks/eval.py's centred problem), goal <= 60 s.
- ``concurrent``: aggregate images/s of 1, 2 and 4 simultaneous J2-Lip2 fd trainings (ResNet-34,
  bs 128) on the one GPU, each over the same wall window: the lever for sweeps of small models.

Each part writes its fragment (``<out>/gpu_check_<device>_parts/<part>.json``) as soon as it
ends, then the fragments present are merged into ``<out>/gpu_check_<device>.json`` and
``.md``: machine, versions, each part's numbers and seconds, and every goal's verdict
(pass / fail / not-run, with value and goal). ``--only`` keeps the other parts' fragments.

    bash benchmarks/gpu_check.sh                          # all parts (make gpu-check)
    bash benchmarks/gpu_check.sh --only eval,concurrent   # rerun two parts
    python benchmarks/gpu_check.py --device cpu --quick   # dry run: every part, tiny sizes
"""

import argparse
import gc
import hashlib
import importlib.util
import json
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
SITE = Path(os.environ.get("LIPEXP_SITE", "/tmp/lipexp-site"))

PARTS = {  # name -> seconds budgeted on one H100: estimates, not yet measured (6 min in
    # all with ~10 s of start-up; the split is printed and recorded per part)
    "tests": 60,  # ~200 small CUDA tests, 8 pytest-xdist processes, collections included
    "step": 90,  # 32 configurations x (5 + 20 step pairs, ~0.5 s of set-up) + 8 versus pairs
    "compile": 70,  # 4 compiled configurations: their first steps compile (~10-30 s a graph)
    "epoch": 20,  # a warm-up, then (compute, epoch) x 2 of 390 steps, ~3 s each
    "eval": 65,  # the goal's 60 s and the random problem's set-up
    "concurrent": 45,  # 3 rounds: spawn + imports + build (~8 s), warm-up and a 6 s window
}

FULL = {
    "step_models": ["resnet34", "allcnn"], "step_batch_sizes": [128, 512],
    "precisions": ["bf16", "32"], "defences": ["j0", "j2", "j2-lip2", "j2-lip2-fd"],
    "warmup": 5, "steps": 20, "test_paths": [],  # [] -> pytest's testpaths: tests/
    "compile_models": ["resnet34", "allcnn"], "compile_batch_size": 128,
    "compile_precision": "bf16", "compile_defences": ["j0", "j2-lip2-fd"],
    "epoch_model": "resnet34", "epoch_batch_size": 128, "epoch_images": 50000,
    "epoch_precision": "bf16", "epoch_pairs": 2,
    "eval_model": "resnet34", "eval_images": 10000, "eval_batch_size": 1000,
    "concurrent_model": "resnet34", "concurrent_batch_size": 128,
    "concurrent_precision": "32", "concurrent_levels": [1, 2, 4], "concurrent_seconds": 6.0,
    "concurrent_warmup": 5,
}
QUICK = FULL | {  # the dry run: every part's code path, tiny sizes (seconds on 2 CPU cores)
    "step_models": ["small_cnn"], "step_batch_sizes": [8], "precisions": ["32"],
    "defences": ["j0", "j2-lip2-fd"], "warmup": 1, "steps": 2,
    "test_paths": ["tests/test_speed_options.py"],  # one file: collecting all takes ~10 s
    "compile_models": ["small_cnn"], "compile_batch_size": 8, "compile_precision": "32",
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
    Goal("tests", "tests", "pytest -m gpu: failed + errors", "==", 0),
    Goal("step.lipexp_vs_hand", "step", "lipexp / hand-written step, every uncompiled "
         "configuration (worst median of paired ratios)", "<=", 1.10),
    Goal("step.fd_vs_j0", "step", "J2-Lip2 fd / J0, every configuration (worst median of "
         "paired ratios, hand-written steps)", "<=", 2.0),
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


def ensure_dependencies(wheelhouse: Path) -> str:
    """Make lipexp's dependencies importable: as they are, from ``SITE`` (installed by an
    earlier call on this machine), or installed there now from the wheelhouse (no network,
    no dependency resolution: the wheelhouse is the list). Child processes (pytest, the
    concurrent workers) get the same path through PYTHONPATH, the source tree first so that
    lipexp always runs from it (the wheel's copy gives only its metadata: the version)."""
    def missing() -> list[str]:
        importlib.invalidate_caches()
        return [m for m in NEEDED if importlib.util.find_spec(m) is None]

    if not missing():
        return "present"
    how = f"from {SITE} (installed earlier)"
    if not all((SITE / m).exists() for m in NEEDED):
        wheels = sorted(str(p) for p in wheelhouse.glob("*.whl"))
        if not wheels:
            raise SystemExit(f"missing {', '.join(missing())} and no wheels in {wheelhouse}: "
                             "run `make wheelhouse` where a package registry is reachable and "
                             "carry wheelhouse/ to this machine")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE),
                        *wheels], check=True)
        how = f"{len(wheels)} wheels from {wheelhouse} into {SITE}"
    sys.path[1:1] = [str(SITE)]  # after the source tree (sys.path[0] or REPO)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PATH"] = f"{SITE / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    if missing():
        raise SystemExit(f"still missing after installing the wheelhouse: {missing()}")
    return how


_BENCH: dict = {}


def bench(name: str):
    """benchmarks/<name>.py as a module (step.py, eval.py: their functions are reused)."""
    if name not in _BENCH:
        spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                      REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _BENCH[name] = module
    return _BENCH[name]


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
    from lipexp.provenance import machine

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

    from lipexp.provenance import provenance

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
            "source_sha256": digest.hexdigest()[:16], "executable": sys.executable}


@contextmanager
def _quiet():
    """Warnings off inside a measurement (Lightning's and lipexp's notes on tiny data sets,
    compile's fd note); lipexp's own messages are tested elsewhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------- parts


def part_tests(ctx) -> dict:
    """``pytest -m gpu`` in a child process; first a collection pass, which finds the test
    files that cannot be imported here for want of a module (wandb is binary and big: the
    wheelhouse does not carry it), to leave out by name rather than fail the run on them."""
    base = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider",
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
    result = {"collected": int(found[1]) if found else 0, "ignored_files": ignored,
              "collection_errors": re.findall(r"^ERROR (\S+)", out, re.M)}
    left_out = "".join(f"; left out: {path} (no {module})" for path, module in ignored.items())
    if ctx.device != "cuda":
        return result | {"goals": {"tests": {"value": None, "detail": (
            f"{result['collected']} CUDA tests collected; not run: no CUDA device{left_out}")}}}
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "junit.xml"
        # pytest-xdist (in the GPU image) runs the small tests side by side on the one GPU
        workers = ["-n", str(ctx.test_workers)] if ctx.test_workers > 1 \
            and importlib.util.find_spec("xdist") else []
        out = pytest("-q", *workers, *ignores, f"--junitxml={xml_path}",
                     timeout=4 * PARTS["tests"])
        counts = {k: 0 for k in ("tests", "failures", "errors", "skipped")}
        if xml_path.exists():
            root = ET.parse(xml_path).getroot()
            for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
                for k in counts:
                    counts[k] += int(suite.get(k, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    bad = counts["failures"] + counts["errors"]
    result |= counts | {"passed": passed, "xdist_workers": ctx.test_workers if workers else 0,
                        "output_tail": out[-3000:] if bad or not passed else out[-300:]}
    detail = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
              f"{counts['skipped']} skipped{left_out}")
    # a run in which no test passed (none collected, all skipped) is no pass
    return result | {"goals": {"tests": {"value": bad, "detail": detail,
                                         "verdict": "pass" if passed and not bad else "fail"}}}


def _step_rows(ctx, models, batch_sizes, precisions, defences, compile: bool):
    step = bench("step")
    rows, versus = [], []
    for model in models:
        for precision in precisions:
            for bs in batch_sizes:
                args = step_args(ctx.device, bs, precision, ctx.s["warmup"], ctx.s["steps"],
                                 compile)
                where = {"batch_size": bs, "precision": precision, "compile": compile}
                for defence in defences:
                    t0 = time.perf_counter()
                    with _quiet():
                        r = step.run_one(model, defence, "linear", args) | where
                    rows.append(r)
                    ctx.log(f"{model} bs {bs} {_p(precision)}{' compiled' if compile else ''} "
                            f"{defence}: hand {r['hand_ms']:.1f} ms, lipexp {r['lipexp_ms']:.1f}"
                            f" ms, ratio {r['ratio_median']:.3f} ({time.perf_counter() - t0:.1f}"
                            " s)")
                if not compile and {"j0", "j2-lip2-fd"} <= set(defences):
                    with _quiet():
                        (v,) = step.run_versus(model, [("j2-lip2-fd", "j0")], "linear", args)
                    versus.append(v | where)
                    ctx.log(f"{model} bs {bs} {_p(precision)}: j2-lip2-fd / j0 = "
                            f"{v['ratio_median']:.3f} (paired)")
    return rows, versus


def part_step(ctx) -> dict:
    s = ctx.s
    rows, versus = _step_rows(ctx, s["step_models"], s["step_batch_sizes"], s["precisions"],
                              s["defences"], compile=False)
    worst = max(rows, key=lambda r: r["ratio_median"])
    fd = max(versus, key=lambda v: v["ratio_median"]) if versus else None
    return {"rows": rows, "versus": versus, "goals": {
        "step.lipexp_vs_hand": {"value": worst["ratio_median"], "detail": (
            f"worst: {worst['model']} {worst['defence']} bs {worst['batch_size']} "
            f"{_p(worst['precision'])}; {sum(r['ratio_median'] <= 1.10 for r in rows)}/{len(rows)} "
            "configurations within")},
        "step.fd_vs_j0": {"value": fd and fd["ratio_median"], "detail": fd and (
            f"worst: {fd['model']} bs {fd['batch_size']} {_p(fd['precision'])}")}}}


def part_compile(ctx) -> dict:
    """The compiled subset. In the CPU dry run TorchDynamo is disabled (torch.compile then
    returns a wrapper that runs eagerly): the code path, not inductor's minutes of C++."""
    s = ctx.s
    dry = ctx.device != "cuda"
    saved = torch._dynamo.config.disable
    torch._dynamo.config.disable = dry or saved
    try:
        rows, _ = _step_rows(ctx, s["compile_models"], [s["compile_batch_size"]],
                             [s["compile_precision"]], s["compile_defences"], compile=True)
    finally:
        torch._dynamo.config.disable = saved
    worst = max(rows, key=lambda r: r["ratio_median"])
    by = {(r["model"], r["defence"]): r["lipexp_ms"] for r in rows}
    fd = {m: by[m, "j2-lip2-fd"] / by[m, "j0"] for m in s["compile_models"]
          if (m, "j0") in by and (m, "j2-lip2-fd") in by}
    fd_model = max(fd, key=fd.get) if fd else None
    return {"rows": rows, "fd_over_j0_unpaired": fd, "dynamo_disabled": dry, "note": (
        f"compiled: bs {s['compile_batch_size']}, {_p(s['compile_precision'])}, "
        f"{', '.join(s['compile_defences'])} (the exact penalty cannot be compiled); with fd "
        "only the J2 gradient is compiled, the penalty's passes run uncompiled") + (
        "; dry run: TorchDynamo disabled" if dry else ""), "goals": {
        "compile.lipexp_vs_hand": {"value": worst["ratio_median"], "detail": (
            f"worst: {worst['model']} {worst['defence']}")},
        "compile.fd_vs_j0": {"value": fd.get(fd_model), "detail": fd_model and (
            f"worst: {fd_model}")}}}


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

    from lipexp.build import build_module
    from lipexp.data.datamodule import to_unit
    from lipexp.data.sources import ImageArrays

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
            "precision": s["epoch_precision"], "on_device": on_device, "pairs": pairs,
            "ratio_median": ratio,
            "epoch_images_per_s": steps * bs / statistics.median(p["epoch_s"] for p in pairs),
            "goals": {"epoch.compute_over_epoch": {"value": ratio, "detail": (
                f"{model} bs {bs} {_p(s['epoch_precision'])}, {steps} steps, data.on_device="
                f"{str(on_device).lower()}")}}}


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

        from lipexp.build import build_module
        from lipexp.data.datamodule import InMemoryImages, keep_batch, to_unit

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
            "precision": s["concurrent_precision"], "defence": "j2-lip2-fd", "rounds": rounds,
            "goals": {}}


PART_FUNCTIONS = {"tests": part_tests, "step": part_step, "compile": part_compile,
                  "epoch": part_epoch, "eval": part_eval, "concurrent": part_concurrent}


# ----------------------------------------------------------------- report


def merge(parts_dir: Path, head: dict) -> dict:
    """The report from the fragments present: each part's, and every goal's verdict."""
    parts = {}
    for name in PARTS:
        path = parts_dir / f"{name}.json"
        parts[name] = json.loads(path.read_text()) if path.exists() else {"status": "not-run"}
    goals = []
    for g in GOALS:
        part = parts[g.part]
        got = part.get("goals", {}).get(g.id, {}) if part["status"] == "ok" else {}
        value = got.get("value")
        detail = got.get("detail") or (f"part {g.part}: {part['status']}"
                                       + (f" ({part['error_line']})" if "error_line" in part
                                          else ""))
        goals.append({"id": g.id, "part": g.part, "goal": f"{g.op} {g.target:g}",
                      "text": g.text, "value": value,
                      "verdict": got.get("verdict") or judge(value, g.op, g.target),
                      "detail": detail})
    return head | {"parts": parts, "goals": goals,
                   "seconds": sum(p.get("seconds", 0) for p in parts.values())}


def _p(precision: str) -> str:
    return {"32": "fp32"}.get(precision, precision)


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) \
        else str(value)


def markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    lines = [f"# GPU check: {m.get('gpu', m['cpu'])} ({report['device']})", ""]
    if report["quick"]:
        lines += ["**Dry run** (`--quick`): tiny sizes; the numbers are not measurements of "
                  "the goals.", ""]
    lines += [f"{report['date']}; lipexp {v['lipexp']} (commit {v['lipexp_commit']}, source "
              f"{v['source_sha256']}); python {v['python']}, torch {v['torch']}, CUDA "
              f"{v['cuda']}, cuDNN {v['cudnn']}, Lightning {v['pytorch_lightning']}; "
              f"driver {m.get('driver')}; CPU {m['cpu']}.", "",
              "| part | goal | measured | goal | verdict | detail |",
              "| --- | --- | ---: | --- | --- | --- |"]
    for g in report["goals"]:
        lines.append(f"| {g['part']} | {g['text']} | {_f(g['value'])} | {g['goal']} | "
                     f"**{g['verdict']}** | {g['detail'] or ''} |")
    lines += ["", "| part | status | seconds | budget (H100) | run |",
              "| --- | --- | ---: | ---: | --- |"]
    for name, p in report["parts"].items():
        lines.append(f"| {name} | {p['status']} | {_f(p.get('seconds'))} | {PARTS[name]} | "
                     f"{p.get('date', '-')} |")
        if p["status"] == "error":
            lines.append(f"| | `{p['error_line']}` | | | |")
    parts = report["parts"]
    for name in ("step", "compile"):
        if parts[name]["status"] != "ok":
            continue
        lines += ["", f"## {name}", "", "| model | bs | precision | defence | hand ms | "
                  "lipexp ms | lipexp / hand |", "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
        for r in parts[name]["rows"]:
            lines.append(f"| {r['model']} | {r['batch_size']} | {_p(r['precision'])} | "
                         f"{r['defence']} | {r['hand_ms']:.2f} | {r['lipexp_ms']:.2f} | "
                         f"{r['ratio_median']:.3f} |")
        for r in parts[name].get("versus", []):
            lines.append(f"\n{r['model']} bs {r['batch_size']} {_p(r['precision'])}: J2-Lip2 fd / "
                         f"J0 = {r['ratio_median']:.3f} (paired, {r['a_ms']:.2f} / "
                         f"{r['b_ms']:.2f} ms)")
        if "note" in parts[name]:
            lines.append(f"\n{parts[name]['note']}")
    if parts["epoch"]["status"] == "ok":
        e = parts["epoch"]
        lines += ["", "## epoch", "", f"{e['model']} J0, bs {e['batch_size']}, "
                  f"{_p(e['precision'])}, {e['steps']} steps, "
                  f"data.on_device={str(e['on_device']).lower()}: "
                  + "; ".join(f"compute {p['compute_s']:.2f} s / epoch {p['epoch_s']:.2f} s"
                              for p in e["pairs"])
                  + f"; {e['epoch_images_per_s']:,.0f} images/s end to end"]
    if parts["eval"]["status"] == "ok":
        e = parts["eval"]
        lines += ["", "## eval", "", f"{e['model']}, {e['images']} images ({e['weights']}), "
                  f"batch {e['batch_size']}, {'bf16' if e['bf16'] else 'fp32'}: "
                  f"{e['seconds']:.1f} s (set-up {e['setup_s']:.1f} s); "
                  + "; ".join(f"{a['attack']} {a['seconds']:.1f} s, {a['forward_per_image']:.0f}"
                              " forward passes per image" for a in e["attacks"])]
    if parts["concurrent"]["status"] == "ok":
        c = parts["concurrent"]
        lines += ["", "## concurrent", "", f"{c['defence']} {c['model']} bs {c['batch_size']} "
                  f"{_p(c['precision'])}, one GPU:", "",
                  "| processes | images/s together | x 1 process | each |",
                  "| ---: | ---: | ---: | --- |"]
        for r in c["rounds"]:
            lines.append(f"| {r['processes']} | {r['aggregate_images_per_s']:,.0f} | "
                         f"{r['speedup']:.2f} | "
                         f"{', '.join(f'{x:,.0f}' for x in r['per_process_images_per_s'])} |")
    return "\n".join(lines) + "\n"


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
    args.log = lambda msg: print(f"[gpu_check {time.perf_counter() - start:6.1f} s] {msg}",
                                 flush=True)
    out = Path(args.out)
    parts_dir = out / f"gpu_check_{args.device}_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    if set(args.parts) == set(PARTS):  # a whole run: no fragment of an earlier one stays
        for old in parts_dir.glob("*.json"):
            old.unlink()
    head = {"device": args.device, "quick": args.quick, "machine": machine_info(args.device),
            "versions": versions(), "dependencies": installed,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": sys.argv}
    args.log(f"{head['machine'].get('gpu', head['machine']['cpu'])}; dependencies: {installed};"
             f" parts {', '.join(args.parts)}")
    report = {}
    for name in PARTS:
        if name not in args.parts:
            continue
        args.log(f"part {name} (budget {PARTS[name]} s on one H100)")
        t0 = time.perf_counter()
        try:
            fragment = {"status": "ok", **PART_FUNCTIONS[name](args)}
        except Exception as e:  # recorded; the next part still runs
            fragment = {"status": "error", "error_line": f"{type(e).__name__}: {e}"[:300],
                        "error": traceback.format_exc()[-4000:]}
            args.log(f"part {name} failed: {fragment['error']}")
        fragment |= {"seconds": time.perf_counter() - t0, "budget_s": PARTS[name],
                     "quick": args.quick, "date": head["date"],
                     "source_sha256": head["versions"]["source_sha256"]}
        write_json_atomic(parts_dir / f"{name}.json", fragment)
        report = merge(parts_dir, head)  # after every part: a crash later loses nothing
        write_json_atomic(out / f"gpu_check_{args.device}.json", report)
        (out / f"gpu_check_{args.device}.md").write_text(markdown(report))
        args.log(f"part {name}: {fragment['status']} in {fragment['seconds']:.1f} s "
                 f"(budget {PARTS[name]} s)")
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for name, p in report["parts"].items():
        print(f"{name:>10}: {p['status']}, {_f(p.get('seconds'))} s (budget {PARTS[name]} s)")
    for g in report["goals"]:
        print(f"{g['verdict']:>10}: {g['text']}: {_f(g['value'])} (goal {g['goal']})")
    args.log(f"written: {out / f'gpu_check_{args.device}.json'} and .md "
             f"(budgets: {sum(PARTS.values())} s in all on one H100)")
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(1 if any(p["status"] == "error" for p in report["parts"].values()) else 0)
