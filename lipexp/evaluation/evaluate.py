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

from lipexp.attacks.threat import Norm
from lipexp.data.datamodule import to_unit
from lipexp.distributed import broadcast_buffers, gather_objects, rank, world_size
from lipexp.evaluation.checks import run_checks
from lipexp.evaluation.curves import error_at, summarize
from lipexp.evaluation.distance_attacks import DistanceAttack
from lipexp.evaluation.lipschitz import certified_curves, lipschitz_results, violation_warnings
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
) -> Evaluation | None:
    """Evaluate ``model`` on images ``x`` (N, C, H, W; uint8 or float in [0, 1]), labels ``y``.

    Images are attacked ``batch_size`` at a time on the model's device; ``bf16`` runs the
    attacks under bfloat16 autocast (clean error and stability statistics stay fp32).
    ``lipschitz_iterations > 0`` adds the Lipschitz analysis (lipschitz.py: the model's
    upper bound, its per-image Jacobian norms by that many power iterations, and the
    certified radii).
    Under data parallelism every rank passes the same images and attacks the batches
    ``b`` with ``b % world == rank``: the batches are those of a single process, so the
    per-image numbers are the same; rank 0 gets the Evaluation, the other ranks None.
    """
    device = next(model.parameters()).device
    broadcast_buffers(model)  # every rank evaluates rank 0's network, BN statistics included
    indices = torch.arange(len(x)) if indices is None else indices
    starts = list(range(0, len(x), batch_size))[rank()::world_size()]
    mine = {start: _attack_batch(model, to_unit(x[start:start + batch_size].to(device)),
                                 y[start:start + batch_size].to(device), attacks, bf16,
                                 lipschitz_iterations)
            for start in starts}
    batches = {k: v for part in gather_objects(mine) for k, v in part.items()}
    if rank() != 0:
        return None
    ordered = [batches[start] for start in sorted(batches)]  # the test set's order
    d = {name: torch.cat([b["distances"][name] for b in ordered]).numpy() for name in attacks}
    per_example = {k: torch.cat([b["stats"][k] for b in ordered]) for k in ordered[0]["stats"]}
    clean_wrong = torch.cat([b["wrong"] for b in ordered])

    results: dict[str, Any] = {
        # the clean error of the evaluated images (results["clean"] is the whole test split's)
        "evaluation": {"n_images": len(x), "clean_error": clean_wrong.double().mean().item(),
                       "batch_size": batch_size, "bf16": bf16},
        "attacks": {},
        "stability": reduce_statistics(per_example),
    }
    results["stability"]["scale"] = "per-example norms (the paper's columns divide by 100)"
    for name, attack in attacks.items():
        entry: dict[str, Any] = {"norm": attack.norm.value}
        if attack.fixed_size is None:
            entry |= summarize(d[name], error_at_sizes[attack.norm], num=grid_points)
        else:
            entry |= {"eps": attack.fixed_size, "n_images": len(x),
                      "error_at": error_at(d[name], [attack.fixed_size])}
        entry["settings"] = attack.settings()
        results["attacks"][name] = entry
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
    return Evaluation(results, d, indices.cpu().numpy(), certified)


def _attack_batch(model: nn.Module, x: Tensor, y: Tensor,
                  attacks: Mapping[str, DistanceAttack], bf16: bool,
                  lipschitz_iterations: int) -> dict[str, Any]:
    """Clean mistakes, stability statistics, the Lipschitz analysis's per-image numbers and
    every attack's distances of one batch (CPU)."""
    with torch.no_grad(), eval_mode(model):  # eval mode: BN running statistics, left as they are
        logits = model(x)
    wrong = (logits.argmax(1) != y).cpu()
    stats = {k: v.cpu() for k, v in stability_statistics(model, x, y).items()}
    lipschitz = {"margin": margins(logits, y).cpu(),
                 "jacobian_l2": jacobian_spectral_norms(model, x, lipschitz_iterations).cpu()
                 } if lipschitz_iterations else {}
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        distances = {name: attack.distances(model, x, y).detach().float().cpu()
                     for name, attack in attacks.items()}
    return {"wrong": wrong, "stats": stats, "distances": distances, "lipschitz": lipschitz}


def write_outputs(evaluation: Evaluation, out_dir: str | os.PathLike) -> dict[str, str]:
    """error_curves.csv, distances.npz (with the image indices), error_curves.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {n: a for n, a in evaluation.results["attacks"].items() if "curve" in a}
    if "lipschitz" in evaluation.results:  # a third curve per norm panel
        curves |= certified_curves(evaluation.results["lipschitz"])
    files = {"curves_csv": out / "error_curves.csv", "distances": out / "distances.npz",
             "figure": out / "error_curves.png"}
    write_curves_csv(curves, files["curves_csv"])
    save_npz_atomic(files["distances"], {"indices": evaluation.indices, **evaluation.distances,
                                         **evaluation.certified})
    plot_error_curves(curves, files["figure"])
    return {k: str(v) for k, v in files.items()}
