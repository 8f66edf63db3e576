"""The study's robustness evaluation of a trained network (docs/method.md, "Evaluation
protocol").

For each attack: per-image adversarial distances, then the error curve, the median
distance and the error at given sizes; for the network: clean error and the stability
statistics; and self-checks for gradient masking (checks.py). ``write_outputs`` puts the
numbers in the run folder.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lipexp.attacks.distance import DistanceAttack
from lipexp.attacks.threat import Norm
from lipexp.data.datamodule import to_unit
from lipexp.distributed import broadcast_buffers, gather_objects, rank, world_size
from lipexp.evaluation.certification import certified_curves, lipschitz_results, violation_warnings
from lipexp.evaluation.checks import run_checks
from lipexp.evaluation.cost import Cost, counting
from lipexp.evaluation.curves import error_at, summarize
from lipexp.evaluation.ensemble import ensemble, ensemble_curves, headline_gaps
from lipexp.evaluation.intervals import (
    DESCRIPTION,
    error_at_intervals,
    proportion_interval,
    with_intervals,
)
from lipexp.evaluation.plots import plot_error_curves, write_curves_csv
from lipexp.evaluation.stability import reduce_statistics, stability_statistics
from lipexp.files import save_npz_atomic
from lipexp.lipschitz.certified import margins
from lipexp.lipschitz.model_bounds import jacobian_spectral_norms
from lipexp.model_state import eval_mode

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    results: dict[str, Any]  # JSON-ready: clean, attacks, stability, checks, evaluation
    distances: dict[str, np.ndarray]  # attack -> (n,) per-image distances
    indices: np.ndarray  # (n,) test-set index of each evaluated image
    # "certified_l2" / "certified_linf" -> (n,) certified radii (empty without the analysis)
    certified: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Mapping[str, DistanceAttack],
    *,
    error_at_sizes: Mapping[Norm, Sequence[float]],
    indices: Tensor | None = None,
    batch_size: int = 500,
    grid_points: int = 100,
    bf16: bool = False,
    lipschitz_iterations: int = 0,
    progress: bool = False,
) -> Evaluation | None:
    """Evaluate ``model`` on images ``x`` (N, C, H, W; uint8 or float in [0, 1]), labels ``y``.

    Images are attacked ``batch_size`` at a time on the model's device, one attack after
    the other (``progress``: a bar per attack, images done and time left); ``bf16`` runs the
    attacks under bfloat16 autocast (clean error and stability statistics stay fp32).
    ``lipschitz_iterations > 0`` adds the Lipschitz analysis (lipschitz.py: the model's
    upper bound, its per-image Jacobian norms by that many power iterations, and the
    certified radii). Each attack's wall seconds and network passes per image go into
    ``results["evaluation"]["cost"]`` (cost.py); the per-image minimum over the attacks of
    each norm into ``results["ensemble"]`` (ensemble.py).
    Under data parallelism every rank passes the same images and attacks the batches
    ``b`` with ``b % world == rank``: the batches are those of a single process, so the
    per-image numbers are the same; rank 0 gets the Evaluation, the other ranks None.
    """
    device = next(model.parameters()).device
    broadcast_buffers(model)  # every rank evaluates rank 0's network, BN statistics included
    indices = torch.arange(len(x)) if indices is None else indices
    starts = list(range(0, len(x), batch_size))[rank()::world_size()]

    def batch(start: int) -> tuple[Tensor, Tensor]:
        end = start + batch_size
        return to_unit(x[start:end].to(device)), y[start:end].to(device)

    mine = {start: _check_batch(model, *batch(start), lipschitz_iterations) for start in starts}
    costs = {name: Cost() for name in attacks}
    n_mine = sum(min(batch_size, len(x) - start) for start in starts)
    for name, attack in attacks.items():
        with tqdm(total=n_mine, desc=f"evaluation: {name}", unit="img", leave=True,
                  disable=not progress or rank() != 0, dynamic_ncols=True) as bar, \
                counting(model, costs[name]):
            for start in starts:
                xb, yb = batch(start)
                mine[start]["distances"][name] = _distances(model, attack, xb, yb, bf16)
                bar.update(len(xb))
    parts = gather_objects((mine, costs))
    if rank() != 0:
        return None
    batches = {k: v for part, _ in parts for k, v in part.items()}
    ordered = [batches[start] for start in sorted(batches)]  # the test set's order
    d = {name: torch.cat([b["distances"][name] for b in ordered]).numpy() for name in attacks}
    per_example = {k: torch.cat([b["stats"][k] for b in ordered]) for k in ordered[0]["stats"]}
    clean_wrong = torch.cat([b["wrong"] for b in ordered])

    results: dict[str, Any] = {
        # the clean error of the evaluated images (results["clean"] is the whole test split's)
        "evaluation": {"n_images": len(x), "clean_error": clean_wrong.double().mean().item(),
                       "clean_error_interval": proportion_interval(clean_wrong.numpy()),
                       "intervals": DESCRIPTION, "batch_size": batch_size, "bf16": bf16,
                       "cost": _total_costs(parts, len(x))},
        "attacks": {},
        "stability": reduce_statistics(per_example),
    }
    results["stability"]["scale"] = "per-example norms (the paper's columns divide by 100)"
    for name, attack in attacks.items():
        entry: dict[str, Any] = {"norm": attack.norm.value}
        if attack.fixed_size is None:
            sizes = error_at_sizes[attack.norm]
            entry |= with_intervals(summarize(d[name], sizes, num=grid_points), d[name], sizes)
        else:
            entry |= {"eps": attack.fixed_size, "n_images": len(x),
                      "error_at": error_at(d[name], [attack.fixed_size]),
                      "error_at_interval": error_at_intervals(d[name], [attack.fixed_size])}
        entry["settings"] = attack.settings()
        results["attacks"][name] = entry
    best = ensemble(attacks, d)
    results["ensemble"] = {
        norm.value: with_intervals(summarize(dist, error_at_sizes[norm], num=grid_points),
                                   dist, error_at_sizes[norm])
        | {"attacks": list(count), "best_count": count} | headline_gaps(results, d, dist, count)
        for norm, (dist, count) in best.items()}
    ensemble_d = {f"ensemble_{norm.value}": dist for norm, (dist, _) in best.items()}
    results["checks"] = run_checks(attacks, d, per_example, clean_wrong)
    certified: dict[str, np.ndarray] = {}
    if lipschitz_iterations:
        per_image = {k: torch.cat([b["lipschitz"][k] for b in ordered])
                     for k in ordered[0]["lipschitz"]}
        # ||J||_2 >= its largest row norm ||J||_{2,inf}: the better of the two lower bounds
        jacobian = torch.maximum(per_image["jacobian_l2"], per_example["jac_2_inf"])
        results["lipschitz"], certified = lipschitz_results(
            model, x.shape[1:], per_image["margin"], jacobian, per_example["grad_loss_l2"], d,
            attacks, error_at_sizes, grid_points)
        results["checks"]["warnings"] += violation_warnings(results["lipschitz"])
    for warning in results["checks"]["warnings"]:
        log.warning("evaluation check: %s", warning)
    return Evaluation(results, d | ensemble_d, indices.cpu().numpy(), certified)


def _total_costs(parts: list[tuple[dict, dict[str, Cost]]], n: int) -> dict[str, dict]:
    """Each attack's cost over the ranks: passes summed, seconds those of the slowest rank
    (the wall time), per image of the ``n`` evaluated; logged one line per attack."""
    out = {}
    for name in parts[0][1]:
        costs = [c[name] for _, c in parts]
        total = sum(costs, Cost())
        total.seconds = max(c.seconds for c in costs)
        out[name] = total.per_image(n)
        log.info("%s: %d images in %.1f s, %.0f forward and %.0f backward passes per image",
                 name, n, total.seconds, out[name]["forward_per_image"],
                 out[name]["backward_per_image"])
    return out


def _check_batch(model: nn.Module, x: Tensor, y: Tensor,
                 lipschitz_iterations: int) -> dict[str, Any]:
    """Clean mistakes, stability statistics and the Lipschitz analysis's per-image numbers
    of one batch (CPU); its ``distances``, filled attack by attack, start empty."""
    with torch.no_grad(), eval_mode(model):  # eval mode: BN running statistics, left as they are
        logits = model(x)
    wrong = (logits.argmax(1) != y).cpu()
    stats = {k: v.cpu() for k, v in stability_statistics(model, x, y).items()}
    lipschitz = {"margin": margins(logits, y).cpu(),
                 "jacobian_l2": jacobian_spectral_norms(model, x, lipschitz_iterations).cpu()
                 } if lipschitz_iterations else {}
    return {"wrong": wrong, "stats": stats, "distances": {}, "lipschitz": lipschitz}


def _distances(model: nn.Module, attack: DistanceAttack, x: Tensor, y: Tensor,
               bf16: bool) -> Tensor:
    """One attack's distances of one batch (CPU, float32)."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        return attack.distances(model, x, y).detach().float().cpu()


def write_outputs(evaluation: Evaluation, out_dir: str | os.PathLike) -> dict[str, str]:
    """error_curves.csv, distances.npz (with the image indices), error_curves.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {n: a for n, a in evaluation.results["attacks"].items() if "curve" in a}
    curves |= ensemble_curves(evaluation.results)
    if "lipschitz" in evaluation.results:  # a third curve per norm panel
        curves |= certified_curves(evaluation.results["lipschitz"])
    files = {"curves_csv": out / "error_curves.csv", "distances": out / "distances.npz",
             "figure": out / "error_curves.png"}
    write_curves_csv(curves, files["curves_csv"])
    save_npz_atomic(files["distances"], {"indices": evaluation.indices, **evaluation.distances,
                                         **evaluation.certified})
    plot_error_curves(curves, files["figure"])
    return {k: str(v) for k, v in files.items()}
