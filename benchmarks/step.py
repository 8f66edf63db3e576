"""Training-step benchmark: lipexp's step inside ``Trainer.fit`` against a hand-written
plain-PyTorch step of the same defence, on the same model instance (README, "Speed").

For each model x defence (x head):

- ``compute``: one Trainer.fit over in-memory batches already on the device. A callback
  runs the hand-written step (below, SGD step included) on each batch at
  ``on_train_batch_start``, then lipexp's own step runs (training_step, backward,
  optimizer step, Lightning's logging); both are timed with the device synchronized, so
  the two alternate (hand, lipexp, hand, lipexp, ...) and each pair sees the same machine
  state. Reported: the median of each and the median of the paired ratios lipexp / hand
  (timings on a shared machine drift by +-20% between runs; paired ratios do not).
- ``wall``: a second fit with lipexp's data module (loader, transfer, uint8 -> float,
  augmentation): the median time between consecutive step starts, and its ratio to the
  compute-only median.
- ``loader``: images/s of the data module's training loader alone (one process), and with
  the conversion and augmentation of ``on_after_batch_transfer``.
- ``versus`` (``--versus A:B,...``): what one defence costs against another, the
  hand-written steps of A and B alternating on one network (A, B, A, B, ...): the median
  of the paired ratios A / B. (The hand-written step makes lipexp's update, tests/e2e/
  test_benchmarks.py, and its time is lipexp's within the ``compute`` ratio.)

Synthetic data of the study's shapes (CIFAR 3x32x32, 10 classes; the small CNN 1x28x28
as MNIST): speed does not depend on the pixels. Writes one JSON file
(``benchmarks/results/<name>.json``) and prints a Markdown table.

    python benchmarks/step.py                                  # CPU: bs 32, 2 threads
    python benchmarks/step.py --models resnet34 --defences j0,j2-lip2 --steps 20
    python benchmarks/step.py --device cuda --batch-size 128 --precision bf16
    python benchmarks/step.py --device cuda --batch-size 512 --precision bf16 --on-device
    python benchmarks/step.py --models resnet34 --defences j2-lip2-fd \
        --versus j2-lip2-fd:j2-lip2,j2-lip2-fd:j2,j2-lip2-fd:j0
"""

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# bookkeeping shared with lipexp, not the step's math: full float32 (autocast and TF32 off),
# batch norm's running statistics kept, the length of a clipped step
import lipexp.defences.batch_stats as batch_stats  # noqa: E402
import lipexp.defences.fd as fd  # noqa: E402
import lipexp.precision as precision  # noqa: E402
from lipexp.runs.provenance import machine  # noqa: E402

MODELS = {  # name -> (conf/model choice, extra overrides, image shape (C, H, W))
    "small_cnn": ("small_cnn", [], (1, 28, 28)),
    "resnet34": ("resnet34", [], (3, 32, 32)),
    "allcnn": ("allcnn", [], (3, 32, 32)),
    "resnext34": ("resnext34", [], (3, 32, 32)),
}
DEFENCES = {  # name -> config overrides
    "j0": ["adv=j0", "lip=none"],
    "j1": ["adv=j1", "lip=none"],
    "j2": ["adv=j2", "lip=none"],
    "j0-lip1": ["adv=j0", "lip=lip1"],
    "j0-lip2": ["adv=j0", "lip=lip2"],
    "j2-lip2": ["adv=j2", "lip=lip2"],
    "j2-lip2-fd": ["adv=j2", "lip=lip2", "lip.method=fd"],
    "j0-lip2-fd": ["adv=j0", "lip=lip2", "lip.method=fd"],
    "j2-lip2-fd-point": ["adv=j2", "lip=lip2", "lip.method=fd", "lip.direction=point"],
    "j2-lip2-fd-reuse": ["adv=j2", "lip=lip2", "lip.method=fd", "lip.reuse_adv_gradient=true"],
}
DEFAULT_DEFENCES = ["j0", "j1", "j2", "j0-lip1", "j0-lip2", "j2-lip2", "j2-lip2-fd"]


# ----------------------------------------------------------------- the hand-written step


def _direction(g: Tensor, dual_norm: int) -> Tensor:
    if dual_norm == 1:
        return g.sign() / math.sqrt(g[0].numel())
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-38).view(-1, 1, 1, 1)


def hand_step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, s: dict,
              autocast) -> None:
    """One training step written out in plain PyTorch (settings ``s`` from the run config):
    J0/J1/J2 at the clean image in eval mode, then CE (+ the penalty: exact double
    backpropagation or the finite difference), backward, SGD step."""
    if s["lip"] is not None and s["lip"]["reuse"]:
        hand_reuse_step(net, opt, x, y, s)
        return
    with autocast():
        g_attack = None
        if s["adv"] in ("j1", "j2"):
            net.eval()
            xg = x.detach().requires_grad_(True)
            (g_attack,) = torch.autograd.grad(F.cross_entropy(net(xg), y, reduction="sum"), xg)
            net.train()
            x = (x + s["eps"] * _direction(g_attack, 1 if s["adv"] == "j1" else 2)).clamp(0, 1)
        x = x.detach()
        if s["lip"] is None:
            loss = F.cross_entropy(net(x), y)
        else:
            p, lam = s["lip"]["dual_norm"], s["lip"]["lam"]
            lam = lam / math.sqrt(x[0].numel()) if s["lip"]["lam_over_sqrt_n"] else lam
            if s["lip"]["method"] == "exact":
                xr = x.requires_grad_(True)
                losses = F.cross_entropy(net(xr), y, reduction="none")
                (g,) = torch.autograd.grad(losses.sum(), xr, create_graph=True)
                norms = g.flatten(1).norm(p=p, dim=1)
            else:
                losses, norms = hand_fd(net, x, y, p, s["lip"]["h"],
                                        g_attack if s["lip"]["direction"] == "attack" else None)
            loss = losses.mean() + lam * norms.max() / len(y)  # batch_mean scaling
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def hand_fd(net: nn.Module, x: Tensor, y: Tensor, p: int, h: float,
            g: Tensor | None) -> tuple[Tensor, Tensor]:
    """(losses, norms) of the fd estimate in full float32 (no autocast, no TF32): d from the
    attack's gradient ``g`` (or from each image's gradient at x), the batch statistics at x held
    fixed at x + h d, a graph there for the arg-max image only (its norm the only one with a
    gradient: the penalty takes the max). With ``--compile`` these passes run on the
    uncompiled network, as lipexp's (fd_grad_norms: swapping batch norm's forward would
    recompile it at every step); only the attack's gradient (hand_step) is compiled."""
    net = getattr(net, "_orig_mod", net)  # torch.compile's wrapper -> the network itself
    stats = batch_stats.BatchStatistics(net)
    with precision.float32(x):
        with stats.record():  # batch norm's one running-statistics update of the step
            losses = F.cross_entropy(net(x.detach()).float(), y, reduction="none")
        if g is None:  # each image's own gradient: the statistics as constants
            xr = x.detach().requires_grad_(True)
            with stats.fixed(differentiable=False):
                (g,) = torch.autograd.grad(F.cross_entropy(net(xr).float(), y,
                                                           reduction="sum"), xr)
        xh = x.detach() + h * _direction(g, p)
        with stats.fixed():
            with torch.no_grad():
                losses_h = F.cross_entropy(net(xh).float(), y, reduction="none")
            k = (losses_h - losses.detach()).argmax().view(1)
            loss_k = F.cross_entropy(net(xh[k]).float(), y[k], reduction="none")
    scale = math.sqrt(x[0].numel()) if p == 1 else 1.0
    return losses, (loss_k - losses[k]) / h * scale


def hand_reuse_step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                    s: dict) -> None:
    """J2-Lip2 / J1-Lip1 fd sharing the attack's passes (lip.reuse_adv_gradient=true): the
    train-mode gradient at x gives d, x_adv = x + eps d is the second point; float32."""
    p, lam, eps = s["lip"]["dual_norm"], s["lip"]["lam"], s["eps"]
    lam = lam / math.sqrt(x[0].numel()) if s["lip"]["lam_over_sqrt_n"] else lam
    with precision.float32(x):
        xr = x.detach().requires_grad_(True)
        with batch_stats.running_stats_kept(net):  # batch norm counts the adversarial batch only
            losses = F.cross_entropy(net(xr), y, reduction="none")
            (g,) = torch.autograd.grad(losses.sum(), xr, retain_graph=True)
        x_adv = (x + eps * _direction(g, p)).clamp(0, 1)
        losses_adv = F.cross_entropy(net(x_adv), y, reduction="none")
        steps = fd.step_lengths(x_adv - x, p)  # the step taken (clipping shortens it)
        norms = (losses_adv - losses) / steps.clamp_min(1e-30) * (
            math.sqrt(x[0].numel()) if p == 1 else 1)
        norms = torch.where(steps > 0, norms, torch.zeros_like(norms))
        loss = losses_adv.mean() + lam * norms.max() / len(y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def hand_settings(cfg) -> dict:
    adv = cfg.adv._target_.rsplit(".", 1)[1]
    adv = {"no_perturbation": "j0", "signed_gradient_step": "j1",
           "l2_gradient_step": "j2"}[adv]
    lip = None
    if "dual_norm" in cfg.lip:
        lip = {k: cfg.lip[k] for k in ("dual_norm", "lam", "lam_over_sqrt_n", "h")}
        lip["direction"] = str(getattr(cfg.lip.direction, "value", cfg.lip.direction))
        lip["reuse"] = bool(cfg.lip.reuse_adv_gradient)
        lip["method"] = str(cfg.lip.method.value if hasattr(cfg.lip.method, "value")
                            else cfg.lip.method)
    return {"adv": adv, "eps": cfg.adv.get("eps", 0.0), "lip": lip}


# ----------------------------------------------------------------- timing


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _pl():
    import pytorch_lightning as pl

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no per-fit banners
    return pl


def make_paired_timer(net, opt, settings, autocast, clock, warmup, with_hand: bool):
    """A Lightning callback timing the steps (built here: Lightning loads on first use)."""
    pl = _pl()

    class _Paired(pl.Callback):
        """hand step at batch start (timed), then lipexp's step from batch start to end."""

        def __init__(self) -> None:
            self.hand, self.lipexp, self.starts = [], [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            x, y = batch
            if with_hand:
                t0 = clock()
                # the network lipexp trains through (compiled with --compile) and its layout
                if module.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                hand_step(module.__dict__["_train_net"], opt, x, y, settings, autocast)
                t1 = clock()
                if batch_idx >= warmup:
                    self.hand.append(t1 - t0)
            self._t = clock()
            self.starts.append(self._t)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx >= warmup:
                self.lipexp.append(clock() - self._t)

    return _Paired()


# ----------------------------------------------------------------- one configuration


def compose(model: str, defence: str, head: str, args) -> object:
    from lipexp.config.root import compose as compose_root

    choice, extra, shape = MODELS[model]
    data = "mnist" if shape[0] == 1 else "cifar10"
    overrides = [f"data={data}", f"model={choice}", f"head={head}", *DEFENCES[defence], *extra,
                 f"data.batch_size={args.batch_size}", "recipe.lr=0.001",
                 "logger=none", "eval.lipschitz=false", "paths.output_dir=/tmp/lipexp_bench",
                 "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
                 "+trainer.enable_checkpointing=false", "callbacks={}",
                 f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                 f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
                 "trainer.limit_val_batches=0"]
    if args.compile:
        overrides.append("+model.compile=true")
    if args.channels_last:
        overrides.append("+model.channels_last=true")
    return compose_root("config", overrides)


def _quartiles(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def synthetic(shape, n: int, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, classes, (n,), generator=g)


def trainer_for(cfg, steps: int, callbacks) -> object:
    from hydra.utils import instantiate

    return instantiate(cfg.trainer, max_epochs=1, max_steps=steps, callbacks=callbacks,
                       logger=False, limit_val_batches=0, num_sanity_val_steps=0)


def run_one(model: str, defence: str, head: str, args) -> dict:
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from lipexp.data.datamodule import InMemoryImages, keep_batch, to_unit
    from lipexp.data.sources import ImageArrays
    from lipexp.runs.build import build_module

    pl = _pl()
    pl.seed_everything(0, verbose=False)
    cfg = compose(model, defence, head, args)
    device = torch.device(args.device)
    clock = Clock(device)
    shape = MODELS[model][2]
    steps = args.warmup + args.steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = build_module(cfg)
    net = module.net
    opt = torch.optim.SGD(net.parameters(), lr=cfg.optimizer.lr, momentum=0.9,
                          weight_decay=cfg.optimizer.weight_decay)
    settings = hand_settings(cfg)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")

    # compute: in-memory float batches already on the device
    x, y = synthetic(shape, args.batch_size * steps)
    x = to_unit(x).to(device)
    y = y.to(device)
    data = DataLoader(InMemoryImages(x, y), batch_size=args.batch_size, shuffle=False,
                      drop_last=True, collate_fn=keep_batch)
    paired = make_paired_timer(net, opt, settings, autocast, clock, args.warmup, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(cfg, steps, [paired]).fit(module, train_dataloaders=data)
    hand, lipexp = paired.hand, paired.lipexp
    ratios = [b / a for a, b in zip(hand, lipexp)]
    result = {
        "model": model, "defence": defence, "head": head,
        "hand_ms": 1e3 * statistics.median(hand), "lipexp_ms": 1e3 * statistics.median(lipexp),
        "ratio_median": statistics.median(ratios),
        "ratio_q25_q75": _quartiles(ratios),
        "steps": len(ratios),
    }
    if args.data_steps > 0:
        # wall: lipexp's data module (loader + augmentation), no hand-written step
        arrays = ImageArrays(*synthetic(shape, args.batch_size * (args.warmup + args.data_steps)
                                        + 1), *synthetic(shape, 16, seed=1))
        dm = instantiate(cfg.data, source=lambda data_dir, download: arrays, download=False,
                         on_device=args.on_device)
        timer = make_paired_timer(net, opt, settings, autocast, clock, args.warmup, False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer_for(cfg, args.warmup + args.data_steps, [timer]).fit(module, datamodule=dm)
        walls = [b - a for a, b in zip(timer.starts, timer.starts[1:])][args.warmup:]
        if walls:
            result["wall_ms"] = 1e3 * statistics.median(walls)
            result["wall_over_compute"] = result["wall_ms"] / result["lipexp_ms"]
    return result


def run_versus(model: str, pairs: list[tuple[str, str]], head: str, args) -> list[dict]:
    """Interleaved hand-written steps of two defences on one network (same weights, same
    batch): the median of the paired ratios A / B, per pair."""
    from lipexp.runs.build import build_module

    _pl().seed_everything(0, verbose=False)
    device = torch.device(args.device)
    clock = Clock(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_module(compose(model, pairs[0][0], head, args)).net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    x, y = synthetic(MODELS[model][2], args.batch_size)
    x, y = x.float().div(255).to(device), y.to(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")

    def timed(settings) -> float:
        t0 = clock()
        hand_step(net, opt, x, y, settings, autocast)
        return clock() - t0

    results = []
    for a, b in pairs:
        sa, sb = (hand_settings(compose(model, d, head, args)) for d in (a, b))
        for _ in range(args.warmup):
            timed(sa), timed(sb)
        times = [(timed(sa), timed(sb)) for _ in range(args.steps)]
        ratios = [ta / tb for ta, tb in times]
        results.append({"model": model, "head": head, "a": a, "b": b,
                        "a_ms": 1e3 * statistics.median(t for t, _ in times),
                        "b_ms": 1e3 * statistics.median(t for _, t in times),
                        "ratio_median": statistics.median(ratios),
                        "ratio_q25_q75": _quartiles(ratios), "steps": len(ratios)})
    return results


def loader_throughput(args, shape=(3, 32, 32), n: int = 50000, seconds: float = 2.0) -> dict:
    """Images/s of the data module's training loader (one process), alone and with the
    uint8 -> float conversion and augmentation (CIFAR-10's crop, flip, cutout)."""
    from lipexp.data.augment import augment
    from lipexp.data.datamodule import ImageDataModule, to_unit
    from lipexp.data.sources import ImageArrays

    arrays = ImageArrays(*synthetic(shape, n), *synthetic(shape, 16, seed=1))
    dm = ImageDataModule(lambda d, dl: arrays, 10, 3, 32, download=False,
                         batch_size=args.batch_size, crop_padding=4, flip=True, cutout=16,
                         on_device=args.on_device)
    dm.setup("fit")
    device = torch.device(args.device)
    clock = Clock(device)
    out = {}
    for name, transform in [("loader_images_per_s", None),
                            ("loader_augment_images_per_s", "augment")]:
        count, t0 = 0, clock()
        while clock() - t0 < seconds:
            for xb, yb in dm.train_dataloader():
                if transform:
                    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                    xb = augment(to_unit(xb), 4, True, 16)
                count += len(yb)
                if clock() - t0 > seconds:
                    break
        out[name] = count / (clock() - t0)
    return out


# ----------------------------------------------------------------- main


def table(results: list[dict]) -> str:
    lines = ["| model | defence | head | hand ms | lipexp ms | lipexp / hand (median of pairs) "
             "| wall ms (data module) | x J0 (lipexp) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    j0 = {(r["model"], r["head"]): r["lipexp_ms"] for r in results if r["defence"] == "j0"}
    for r in results:
        base = j0.get((r["model"], r["head"]))
        lines.append(f"| {r['model']} | {r['defence']} | {r['head']} | {r['hand_ms']:.1f} | "
                     f"{r['lipexp_ms']:.1f} | {r['ratio_median']:.2f} | "
                     f"{r.get('wall_ms', float('nan')):.1f} | "
                     f"{r['lipexp_ms'] / base if base else float('nan'):.2f} |")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small_cnn,resnet34,allcnn,resnext34",
                   help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--defences", default=",".join(DEFAULT_DEFENCES),
                   help=f"comma-separated, from {','.join(DEFENCES)}")
    p.add_argument("--heads", default="linear", help="comma-separated: linear,tanh")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 CPU, 128 GPU")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--steps", type=int, default=20, help="measured step pairs")
    p.add_argument("--warmup", type=int, default=3, help="steps not measured")
    p.add_argument("--data-steps", type=int, default=10,
                   help="steps with the data module (0: skip the wall measurement)")
    p.add_argument("--loader-seconds", type=float, default=2.0, help="0: skip")
    p.add_argument("--compile", action="store_true", help="+model.compile=true")
    p.add_argument("--channels-last", action="store_true", help="+model.channels_last=true")
    p.add_argument("--on-device", action="store_true", help="data.on_device=true (GPU)")
    p.add_argument("--versus", default="", help="A:B,C:D: interleaved defence pairs "
                   "(hand-written steps), the median paired ratio A / B per model and head")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 128 if args.device == "cuda" else 32
    args.pairs = [tuple(pair.split(":")) for pair in args.versus.split(",") if pair]
    if any(len(pair) != 2 for pair in args.pairs):
        p.error(f"--versus takes A:B pairs, got {args.versus}")
    for name, known in [("models", MODELS), ("defences", DEFENCES)]:
        unknown = set(getattr(args, name).split(",")) - set(known)
        if name == "defences":
            unknown |= {d for pair in args.pairs for d in pair} - set(known)
        if unknown:
            p.error(f"unknown {name}: {', '.join(sorted(unknown))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    results, versus = [], []
    for model in args.models.split(","):
        for head in args.heads.split(","):
            for defence in filter(None, args.defences.split(",")):
                r = run_one(model, defence, head, args)
                print(json.dumps(r), flush=True)
                results.append(r)
            if args.pairs:
                versus += run_versus(model, args.pairs, head, args)
                print(json.dumps(versus[-len(args.pairs):]), flush=True)
    report = {
        "machine": machine(args.device),
        "device": args.device,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "threads": args.threads,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "steps": args.steps,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
        "versus": versus,
    }
    if args.loader_seconds > 0:
        report |= loader_throughput(args, seconds=args.loader_seconds)
    name = f"{args.device}_bs{args.batch_size}_{'fp32' if args.precision == '32' else 'bf16'}"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))
    for v in versus:
        print(f"{v['model']} {v['head']}: {v['a']} / {v['b']} = {v['ratio_median']:.3f} "
              f"(median of {v['steps']} pairs; {v['a_ms']:.1f} / {v['b_ms']:.1f} ms)")
    for key in ("loader_images_per_s", "loader_augment_images_per_s"):
        if key in report:
            print(f"{key}: {report[key]:,.0f}")
    print(f"written: {out}")
    return report


if __name__ == "__main__":
    main()
