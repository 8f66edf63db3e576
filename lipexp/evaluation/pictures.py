"""Pictures of the attacks (docs/evaluation.md, "Pictures of the attacks"): for a few test
images per norm, the clean image, its adversarial example at the best known distance and
the perturbation, in the run folder and on W&B, with a table of those images.

The images of a norm are chosen among those classified right and broken (best known
distance ``0 < d < inf``, ensemble.py): the easiest (smallest ``d``), the hardest (largest
finite ``d``) and those around the median, ``eval.pictures`` of them (``choose``).

The attacks return distances, not examples (lipexp.attacks.distance), so the chosen images
are attacked again, those of one attack together, by the attack that gave each its best
known distance, while a forward hook on the network keeps, per image, the smallest input
that the network misclassified (``find_examples``). Every attack reports the norm of an
example that the network was seen to misclassify (the search's successes, and FMN's,
DeepFool's and CW's final check, are forward passes of that very example), and an image's
attack does not depend on the other images of its batch for lipexp's own attacks (PGD
search, FMN) or DeepFool, so the example found again is the one measured: its norm is the
reported distance up to float rounding (the network's outputs on another batch can differ
in the last bits, which can move the search within its ``rtol``). Where the example is
larger than reported by more than the attack's tolerance (CW stops a batch as a whole,
Square draws its random squares for the batch), the image's next attack of the norm is
tried, and the smallest example shown, with a warning. Each example is checked
misclassified afresh, in full precision; the attacks run again under the evaluation's
autocast (``eval.bf16``). Cost: one attack run per chosen image and norm, in batches
of at most ``eval.pictures`` images (``results["pictures"]["cost"]``: the passes, counted as
``results["evaluation"]["cost"]``'s).
"""

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lipexp.attacks.distance import DistanceAttack
from lipexp.attacks.threat import THREATS, Norm
from lipexp.data.datamodule import to_unit
from lipexp.evaluation.cost import Cost, counting
from lipexp.evaluation.gallery import plot_pictures
from lipexp.files import save_npz_atomic
from lipexp.model_state import eval_mode

log = logging.getLogger(__name__)

PICTURES = "pictures.npz"  # in the run folder; results["files"]["pictures"]
FIGURE = "attacks_{norm}.png"  # one per norm; results["files"]["pictures_<norm>"]
TOLERANCE = 1e-3  # relative: an example found again may exceed the distance by this much
# (or by the attack's own ``rtol``, a search's): the float rounding of another batch
KEEP = 4  # the smallest misclassified inputs kept per image, checked afresh in that order


def choose(distances: np.ndarray, n: int) -> np.ndarray:
    """Positions of up to ``n`` images among those with ``0 < d < inf``, easiest first: the
    easiest (smallest ``d``), the hardest (largest finite ``d``) and the ``n - 2`` around the
    median (``n = 1``: the median only); all of them when there are at most ``n``. Ties
    keep the images' order."""
    d = np.asarray(distances, dtype=np.float64)
    eligible = np.flatnonzero((d > 0) & np.isfinite(d))
    order = eligible[np.argsort(d[eligible], kind="stable")]
    m = len(order)
    if m <= n:
        return order
    if n == 1:
        return order[[(m - 1) // 2]]
    inner = np.arange(1, m - 1)
    near = inner[np.argsort(np.abs(inner - (m - 1) / 2), kind="stable")][: n - 2]
    return order[np.sort(np.concatenate([[0], near, [m - 1]]).astype(int))]


class _Smallest:
    """A forward hook on the network that keeps, for each image of ``x`` (k, C, H, W) with
    labels ``y`` (k,), the ``KEEP`` smallest inputs (in the norm) that the network
    misclassifies. An input counts for the image nearest to it (each one that near): an
    attack moves an image by far less than the distance between two images of a data set,
    and an example counts only as what it is for that image, its norm measured from it and
    its prediction against that image's label."""

    def __init__(self, x: Tensor, y: Tensor, norm: Norm) -> None:
        self.x, self.y, self.threat = x, y, THREATS[norm]
        self.found: list[list[tuple[float, Tensor]]] = [[] for _ in range(len(x))]

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        inputs = args[0] if args else None
        if not (isinstance(inputs, Tensor) and isinstance(output, Tensor)
                and inputs.shape[1:] == self.x.shape[1:] and output.dim() == 2
                and len(output) == len(inputs)):
            return
        with torch.no_grad():
            inputs = inputs.detach().to(self.x.dtype)
            sizes = torch.stack([self.threat.norm(inputs - image) for image in self.x], 1)
            nearest = sizes <= sizes.min(1, keepdim=True).values  # (b, k)
            wrong = output.detach().argmax(1)[:, None] != self.y[None, :]
            for row, j in (nearest & wrong).nonzero().tolist():
                size, kept = float(sizes[row, j]), self.found[j]
                if all(size != s for s, _ in kept) and (len(kept) < KEEP or size < kept[-1][0]):
                    kept.append((size, inputs[row:row + 1].clone()))
                    kept.sort(key=lambda f: f[0])
                    del kept[KEEP:]


def find_examples(model: nn.Module, x: Tensor, y: Tensor, attack: DistanceAttack,
                  bf16: bool = False) -> list[tuple[Tensor, float, int] | None]:
    """For each image of ``x`` (k, C, H, W) with labels ``y`` (k,), attacked together by
    ``attack`` (under bfloat16 autocast with ``bf16``, as the evaluation's attacks):
    ``(x_adv (1, C, H, W), ||x_adv - x_i||, prediction)``, the smallest example that the
    network misclassified among those it saw (``_Smallest``), checked afresh in full
    precision; None where there is none."""
    seen = _Smallest(x, y, attack.norm)
    handle = model.register_forward_hook(seen)
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            attack.distances(model, x, y)
    finally:
        handle.remove()
    out: list[tuple[Tensor, float, int] | None] = [None] * len(x)
    kept = [(j, size, x_adv) for j, found in enumerate(seen.found) for size, x_adv in found]
    if not kept:
        return out
    with torch.no_grad(), eval_mode(model), torch.autocast(x.device.type, enabled=False):
        pred = model(torch.cat([x_adv for _, _, x_adv in kept])).argmax(1).tolist()
    for (j, size, x_adv), p in zip(kept, pred):  # each image's smallest first
        if out[j] is None and p != int(y[j]):
            out[j] = x_adv, size, p
    return out


def make_pictures(model: nn.Module, x: Tensor, y: Tensor,
                  attacks: Mapping[str, DistanceAttack], evaluation: Any,
                  out_dir: str | os.PathLike, n: int, bf16: bool = False
                  ) -> tuple[dict[str, str], dict[str, Any]]:
    """Pictures of up to ``n`` images per norm of ``evaluation`` (evaluate.Evaluation of
    ``model`` on ``x`` (N, C, H, W; uint8 or float in [0, 1]) and ``y``): ``pictures.npz``
    (per norm: ``<norm>_index`` (test-set index), ``_x``, ``_x_adv`` (k, C, H, W, float32 in
    [0, 1]), ``_label``, ``_clean_pred``, ``_pred_adv``, ``_distance`` (``||x_adv - x||``),
    ``_reported`` (the best known distance), ``_attack`` (the attack that found x_adv)) and
    one figure ``attacks_<norm>.png`` per norm with images; ``bf16``: the evaluation's
    attacks ran under bfloat16 autocast, and run again so. Returns ``(files, summary)``:
    the paths for ``results["files"]`` and ``results["pictures"]`` (per norm the indices and
    attacks, the examples larger than reported, the passes of the attacks run again)."""
    device = next(model.parameters()).device
    out = Path(out_dir)
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {"n": n, "norms": {}}
    files: dict[str, str] = {}
    cost = Cost()
    with counting(model, cost):
        for norm in Norm:
            best = evaluation.distances.get(f"ensemble_{norm.value}")
            if best is None:  # only fixed-size checks of this norm: no best distances
                continue
            names = [a for a, attack in attacks.items() if attack.norm == norm]
            rows = _pictures(model, x, y, choose(best, n), names, attacks, evaluation,
                             device, norm, bf16)
            arrays |= _stack(norm.value, rows, x.shape[1:])
            summary["norms"][norm.value] = {
                "index": [r["index"] for r in rows], "attack": [r["attack"] for r in rows],
                "larger_than_reported": sum(r["larger"] for r in rows)}
            if rows:
                files[f"pictures_{norm.value}"] = str(out / FIGURE.format(norm=norm.value))
                plot_pictures(rows, norm.value, files[f"pictures_{norm.value}"])
    summary["cost"] = {"forward": cost.forward, "backward": cost.backward,
                       "seconds": cost.seconds}
    files["pictures"] = str(out / PICTURES)
    save_npz_atomic(files["pictures"], arrays)
    log.info("pictures: %s, %d forward and %d backward passes", ", ".join(
        f"{len(s['index'])} {norm}" for norm, s in summary["norms"].items()) or "none",
        cost.forward, cost.backward)
    return files, summary


def _tolerance(attack: DistanceAttack) -> float:
    return max(TOLERANCE, float(getattr(attack, "rtol", 0.0)))


def _pictures(model: nn.Module, x: Tensor, y: Tensor, positions: np.ndarray,
              names: list[str], attacks: Mapping[str, DistanceAttack], evaluation: Any,
              device: torch.device, norm: Norm, bf16: bool) -> list[dict[str, Any]]:
    """The examples of the images at ``positions`` at their best known distance in
    ``norm``, found again by the attacks ``names`` of that norm: first each image's attack
    with the smallest distance (the images of one attack together), then, for an image
    whose example is larger than reported, the next (see the module)."""
    if not len(positions):
        return []
    xs, ys = to_unit(x[positions].to(device)), y[positions].to(device)
    reported = [float(evaluation.distances[f"ensemble_{norm.value}"][p]) for p in positions]
    tries = [sorted((a for a in names if 0 < evaluation.distances[a][p] < np.inf),
                    key=lambda a: evaluation.distances[a][p]) for p in positions]
    found: list[list[tuple[tuple[Tensor, float, int], str]]] = [[] for _ in positions]
    pending = [i for i in range(len(positions)) if tries[i]]
    while pending:
        groups: dict[str, list[int]] = {}
        for i in pending:
            groups.setdefault(tries[i].pop(0), []).append(i)
        for name, group in groups.items():
            examples = find_examples(model, xs[group], ys[group], attacks[name], bf16)
            for i, example in zip(group, examples):
                if example is not None:
                    found[i].append((example, name))
        pending = [i for i in pending if tries[i] and not any(
            e[1] <= reported[i] * (1 + _tolerance(attacks[a])) for e, a in found[i])]
    with torch.no_grad(), eval_mode(model), torch.autocast(device.type, enabled=False):
        clean_pred = model(xs).argmax(1).tolist()
    rows = []
    for i, p in enumerate(positions):
        index = int(evaluation.indices[p])
        if not found[i]:
            log.warning("pictures: image %d: no %s attack found an example again (best "
                        "known distance %.4g); not pictured", index, norm.value, reported[i])
            continue
        (x_adv, size, pred), attack = min(found[i], key=lambda f: f[0][1])
        larger = size > reported[i] * (1 + _tolerance(attacks[attack]))
        if larger:
            log.warning("pictures: image %d: the %s example found again (%s) has norm %.4g, "
                        "its best known distance is %.4g", index, norm.value, attack, size,
                        reported[i])
        rows.append({"index": index, "x": xs[i].cpu().numpy(), "x_adv": x_adv[0].cpu().numpy(),
                     "label": int(ys[i]), "clean_pred": clean_pred[i], "pred_adv": pred,
                     "distance": size, "reported": reported[i], "attack": attack,
                     "larger": bool(larger)})
    return rows


def _stack(norm: str, rows: list[dict[str, Any]], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The npz arrays ``<norm>_<key>`` of one norm's pictures (empty ones without)."""
    def column(key: str, dtype: Any) -> np.ndarray:
        return np.array([r[key] for r in rows], dtype=dtype)

    images = {k: (np.stack([r[k] for r in rows]).astype(np.float32) if rows
                  else np.zeros((0, *shape), np.float32)) for k in ("x", "x_adv")}
    return {f"{norm}_index": column("index", np.int64), f"{norm}_x": images["x"],
            f"{norm}_x_adv": images["x_adv"], f"{norm}_label": column("label", np.int64),
            f"{norm}_clean_pred": column("clean_pred", np.int64),
            f"{norm}_pred_adv": column("pred_adv", np.int64),
            f"{norm}_distance": column("distance", np.float64),
            f"{norm}_reported": column("reported", np.float64),
            f"{norm}_attack": np.array([r["attack"] for r in rows], dtype=str)}
