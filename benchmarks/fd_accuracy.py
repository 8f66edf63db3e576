"""How close the fd penalty's estimates are to exact input-gradient norms on a trained
network (docs/method.md, "Finite-difference estimate of the gradient norm").

For training batches of a run's checkpoint (its data and J1/J2 step, train mode as in a
training step), the per-image norms at the adversarial image:

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
"""

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
    p.add_argument("checkpoint")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--h", type=float, default=None, help="default: the run's lip.h")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    main()
