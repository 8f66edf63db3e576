"""How close the fd penalty's estimates are to exact input-gradient norms on a trained
network (docs/method.md, "Finite-difference estimate of the gradient norm"), and how the
exact penalty's two batch statistics compare with fd ("Which gradient the penalty sees:
batch statistics live or fixed").

With a checkpoint: for training batches of that run (its data and J1/J2 step, train mode
as in a training step), the per-image norms at the adversarial image:

- ``own``: ``||grad l_i(x_i)||`` with the batch statistics held fixed, by double
  backpropagation on a copy whose batch norm layers normalize with the batch's statistics
  (the quantity the fd estimate estimates);
- ``exact``: what ``lip.method=exact`` penalizes, the gradient of the batch's summed loss
  through train-mode batch norm (cross-terms between images included);
- ``fd_attack`` / ``fd_point``: the fd estimate along the attack's gradient (the default)
  and along each image's own gradient at the point;
- ``fd_reuse``: the batch max of ``lip.reuse_adv_gradient=true``'s estimate (shared passes,
  ``h = eps``), which is taken at the CLEAN image: against ``own`` at the clean image.

Reports, relative to ``own``, the per-image ratios (median, 5% and 95% quantiles, extremes)
and the ratios of the batch maxima (the number the penalty uses). The batches are drawn
with the run's seed, so reruns see the same ones (not the batches training saw). Writes
JSON.

    python benchmarks/fd_accuracy.py outputs/default/checkpoints/last.ckpt --batches 8

Without a checkpoint (``lip.batch_stats``): for each head (``tanh``: the default run, small
CNN with batch norm and the tanh head, which batch-normalizes the logits; ``linear``: the
same CNN, batch norm in its body only) it trains the default J2-Lip2 digits run three times,
with ``lip.method=fd`` (``fd``), ``lip.method=exact lip.batch_stats=fixed``
(``exact_fixed``) and ``lip.batch_stats=live`` (``exact_live``, the authors'), each for
``--epochs`` epochs from the same initial weights (the run's seed), and on each trained
network measures every estimate on training batches as above: the batch max of each
(``grad_norm_max``), the penalty it makes (``lam * max / B``: ``scaling=batch_mean``) and
its ratio to ``exact_fixed`` (``fd_point``, ``exact_fixed`` and ``own`` are one quantity:
the ratios say how close; ``exact_live`` is another). With each run's best-known median l2
distance (``results["ensemble"]["l2"]["median"]``, the per-image minimum over its l2
attacks, ``--attacks``) and clean error. Runs with one torch thread (``--threads``); about
2 minutes on 2 CPU cores; ``--tiny`` (a few steps of a width-4 CNN, 10 images) checks
the script in seconds.

    python benchmarks/fd_accuracy.py                   # -> results/fd_accuracy_batch_stats.json
    python benchmarks/fd_accuracy.py --epochs 40 --set lip.lam=1.0 --out /tmp/long.json
"""

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lipexp.config.root import compose  # noqa: E402
from lipexp.data.datamodule import to_unit  # noqa: E402
from lipexp.defences.adversarial import STEPS, input_gradient  # noqa: E402
from lipexp.defences.batch_stats import with_batch_statistics  # noqa: E402
from lipexp.defences.compose import adversarial_fd_objective  # noqa: E402
from lipexp.defences.fd import fd_grad_norms, unit_direction  # noqa: E402
from lipexp.defences.penalty import exact_grad_norms  # noqa: E402
from lipexp.runs.build import build_datamodule, build_module  # noqa: E402
from lipexp.runs.checkpoint import load_run_checkpoint  # noqa: E402
from lipexp.runs.provenance import machine  # noqa: E402


def summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else values * 19
    return {"median": statistics.median(values), "q05": q[0], "q95": q[-1],
            "min": min(values), "max": max(values)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a run's checkpoint; without: train and compare lip.batch_stats")
    p.add_argument("--batches", type=int, default=None,
                   help="training batches measured (default 8 with a checkpoint, else 4)")
    p.add_argument("--h", type=float, default=None, help="default: the run's lip.h")
    p.add_argument("--out", default=None)
    p.add_argument("--epochs", type=int, default=10, help="without a checkpoint: per run")
    p.add_argument("--heads", default="tanh,linear", help="without a checkpoint: conf/head/")
    p.add_argument("--attacks", default="l2_pgd,l2_fmn", help="without a checkpoint: l2 attacks "
                   "of conf/attacks/ whose per-image minimum gives the median")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's with a checkpoint, else 1)")
    p.add_argument("--runs", default=None, help="without a checkpoint: keep the run folders "
                   "here (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="without a checkpoint: a few steps "
                   "of a width-4 CNN, 10 evaluated images (checks the script)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="without a checkpoint: an override of every run "
                   "(repeatable): --set lip.lam=1.0")
    args = p.parse_args(argv)
    if args.threads or args.checkpoint is None:
        torch.set_num_threads(args.threads or 1)
    if args.checkpoint is None:
        return compare_batch_stats(args)
    return checkpoint_accuracy(args, p)


def checkpoint_accuracy(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict:
    """The estimates against ``own`` on a run's checkpoint (the module docstring)."""
    args.batches = args.batches or 8
    run = load_run_checkpoint(args.checkpoint)
    cfg = OmegaConf.create(run.config)
    module = build_module(cfg)
    module.load_state_dict(run.state_dict)
    net = module.net.train()
    adv = instantiate(cfg.adv)  # the run's J1/J2 (module.perturb passes fd's batch through)
    step = STEPS.get(getattr(adv, "func", adv))
    if step is None:
        p.error("the run has no J1/J2 step (adv=j0): no attack direction to compare")
    eps, clip = adv.keywords["eps"], adv.keywords.get("clip", True)
    dual_norm = int(cfg.lip.get("dual_norm", 2))
    h = args.h or float(cfg.lip.get("h", 0.01))
    torch.manual_seed(int(cfg.seed))  # the same batches at every run
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    names = ("exact", "fd_attack", "fd_point")
    per_image = {k: [] for k in names}
    batch_max = {k: [] for k in (*names, "fd_reuse")}
    for i, (x, y) in enumerate(datamodule.train_dataloader()):
        if i == args.batches:
            break
        x = to_unit(x)  # uint8 -> float in [0, 1], not augmented
        g = input_gradient(net, x, y)
        x_adv = step(x, g, eps, clip)
        own = exact_grad_norms(with_batch_statistics(net, x_adv), x_adv, y, dual_norm).norms
        state = copy.deepcopy(net.state_dict())  # the passes below update running stats
        norms = {"exact": exact_grad_norms(net, x_adv, y, dual_norm).norms,
                 "fd_attack": fd_grad_norms(net, x_adv, y, dual_norm, h,
                                            direction=unit_direction(g, dual_norm)).norms,
                 "fd_point": fd_grad_norms(net, x_adv, y, dual_norm, h).norms}
        _, logs = adversarial_fd_objective(net, x, y, eps=eps, clip=clip, dual_norm=dual_norm,
                                           lam=0.0)  # h = eps: the shared passes' estimate
        net.load_state_dict(state)
        for name, value in norms.items():
            per_image[name] += (value.detach() / own.detach()).tolist()
            batch_max[name].append((value.max() / own.max()).item())
        own_clean = exact_grad_norms(with_batch_statistics(net, x), x, y, dual_norm).norms
        batch_max["fd_reuse"].append((logs["grad_norm_max"] / own_clean.max()).item())
    report = {"checkpoint": str(Path(args.checkpoint).resolve()),
              "head": cfg.head._target_.rsplit(".", 1)[-1], "h": h, "eps": eps, "clip": clip,
              "dual_norm": dual_norm, "batches": len(batch_max["exact"]),
              "batch_size": int(cfg.data.batch_size), "machine": machine("cpu"),
              "ratios_to_own": {name: {"per_image": summary(per_image[name]) if name in
                                       per_image else None,
                                       "batch_max": summary(batch_max[name])}
                                for name in batch_max}}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "fd_accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["ratios_to_own"], indent=1))
    return report


# lip.batch_stats comparison: the three penalties trained, and the estimates measured
TRAINED = {"fd": ["lip.method=fd"],
           "exact_fixed": ["lip.method=exact", "lip.batch_stats=fixed"],
           "exact_live": ["lip.method=exact", "lip.batch_stats=live"]}
ESTIMATES = ("fd", "fd_point", "exact_fixed", "exact_live", "own")
TINY = ["model.width=4", "+trainer.limit_train_batches=2", "eval.n_images=10"]


def estimates(net, x, y, step, eps: float, clip: bool, dual_norm: int,
              h: float) -> dict[str, torch.Tensor]:
    """(B,) norms of each of ``ESTIMATES`` at the adversarial image of a training batch
    (train mode, as the training step), the running statistics left as they were: ``fd``
    along the attack's gradient (lip.method=fd's default), ``fd_point`` along each image's
    own, ``exact_fixed`` / ``exact_live`` (lip.batch_stats), ``own`` the fixed-statistics
    gradient by PyTorch's layers (``with_batch_statistics``)."""
    g = input_gradient(net, x, y)
    x_adv = step(x, g, eps, clip)
    state = copy.deepcopy(net.state_dict())  # the passes below update running stats
    norms = {"fd": fd_grad_norms(net, x_adv, y, dual_norm, h,
                                 direction=unit_direction(g, dual_norm)).norms,
             "fd_point": fd_grad_norms(net, x_adv, y, dual_norm, h).norms,
             "exact_fixed": exact_grad_norms(net, x_adv, y, dual_norm,
                                             batch_stats="fixed").norms,
             "exact_live": exact_grad_norms(net, x_adv, y, dual_norm,
                                            batch_stats="live").norms}
    net.load_state_dict(state)
    norms["own"] = exact_grad_norms(with_batch_statistics(net, x_adv), x_adv, y,
                                    dual_norm).norms
    return {k: v.detach() for k, v in norms.items()}


def trained_run(overrides: list[str], folder: Path) -> tuple[dict, dict]:
    """``(config, results)`` of the run of ``overrides`` trained and evaluated in
    ``folder`` as run.py would (lipexp.runs.train.run), quietly."""
    import logging
    import warnings

    from lipexp.runs.train import run

    cfg = compose("config", [f"paths.output_dir={folder}", "logger=none",
                             "trainer.enable_progress_bar=false",
                             "+trainer.enable_model_summary=false", "eval.progress=false",
                             "eval.lipschitz=false", *overrides])
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = run(cfg)
    finally:
        logging.disable(level)
    return OmegaConf.to_container(cfg, resolve=True), results


def compare_batch_stats(args: argparse.Namespace) -> dict:
    """fd, exact-fixed and exact-live: each trained per head, each measured by all
    estimates (the module docstring)."""
    heads = [h for h in args.heads.split(",") if h]
    attacks = [a for a in args.attacks.split(",") if a]
    batches = args.batches or (1 if args.tiny else 4)
    common = [f"trainer.max_epochs={1 if args.tiny else args.epochs}",
              f"attacks=[{','.join(attacks)}]", *(TINY if args.tiny else []), *args.overrides]
    start = time.perf_counter()
    rows, pooled, settings = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs) if args.runs else Path(tmp)
        for head in heads:
            row = {"head": head, "trained": {}}
            for method, lip in TRAINED.items():
                config, results = trained_run([f"head={head}", *lip, *common],
                                              root / f"{head}_{method}")
                cfg = OmegaConf.create(config)
                run = load_run_checkpoint(Path(config["paths"]["output_dir"]) / "checkpoints"
                                          / "last.ckpt")
                module = build_module(cfg)
                module.load_state_dict(run.state_dict)
                net = module.net.train()
                adv = instantiate(cfg.adv)
                step = STEPS[getattr(adv, "func", adv)]
                eps, clip = adv.keywords["eps"], adv.keywords.get("clip", True)
                dual_norm, h = int(cfg.lip.dual_norm), args.h or float(cfg.lip.h)
                settings = {"h": h, "eps": eps, "clip": clip, "dual_norm": dual_norm,
                            "lam": float(cfg.lip.lam), "batch_size": int(cfg.data.batch_size)}
                weight = float(cfg.lip.lam) / int(cfg.data.batch_size)  # batch_mean, Lip2
                torch.manual_seed(int(cfg.seed))  # the same batches for every run
                datamodule = build_datamodule(cfg)
                datamodule.setup("fit")
                maxima = {k: [] for k in ESTIMATES}
                for i, (x, y) in enumerate(datamodule.train_dataloader()):
                    if i == batches:
                        break
                    norms = estimates(net, to_unit(x), y, step, eps, clip, dual_norm, h)
                    for k, v in norms.items():
                        maxima[k].append(v.max().item())
                        pooled.setdefault(f"{head}: {k}", {"per_image": [], "batch_max": []})
                        pooled[f"{head}: {k}"]["per_image"] += (v / norms["own"]).tolist()
                        pooled[f"{head}: {k}"]["batch_max"].append(
                            (v.max() / norms["own"].max()).item())
                sizes = {k: statistics.median(v) for k, v in maxima.items()}
                ensemble = results.get("ensemble", {}).get("l2", {})
                row["trained"][method] = {
                    "median_l2": ensemble.get("median"),
                    "clean_error": results["clean"]["error"],
                    "grad_norm_max": sizes,
                    "penalty": {k: weight * v for k, v in sizes.items()},
                    "ratio_to_exact_fixed": {k: statistics.median(
                        a / b for a, b in zip(maxima[k], maxima["exact_fixed"]))
                        for k in ESTIMATES}}
                print(f"{head:6s} trained {method:11s}: median l2 "
                      f"{row['trained'][method]['median_l2']}, grad_norm_max "
                      + ", ".join(f"{k} {v:.4g}" for k, v in sizes.items()), flush=True)
            rows.append(row)
    report = {"mode": "batch_stats", "machine": machine("cpu"),
              "seconds": time.perf_counter() - start,
              "epochs": 1 if args.tiny else args.epochs, "tiny": args.tiny,
              "overrides": common, "attacks": attacks, **settings, "batches": batches,
              "head": ", ".join(heads), "models": rows,
              # for benchmarks/tables.py: each estimate over own (the fixed-statistics norm),
              # pooled over the batches of the three trained networks of each head
              "ratios_to_own": {name: {"per_image": summary(v["per_image"]),
                                       "batch_max": summary(v["batch_max"])}
                                for name, v in pooled.items() if not name.endswith(": own")}}
    out = Path(args.out) if args.out else (REPO / "benchmarks" / "results"
                                          / "fd_accuracy_batch_stats.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["models"], indent=1))
    return report


if __name__ == "__main__":
    main()
