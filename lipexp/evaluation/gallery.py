"""The pictures of the attacks drawn and shown (pictures.py finds them): a figure per norm
(clean image, adversarial example, amplified perturbation) and, on W&B, the figures and a
table of the pictured images with every attack's distance."""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas for png
from pytorch_lightning.loggers import Logger, WandbLogger

from lipexp.attacks.threat import Norm
from lipexp.files import atomic_path

NORM_LABEL = {"l2": r"$\|\delta\|_2$", "linf": r"$\|\delta\|_\infty$"}


def displayed(image: np.ndarray) -> np.ndarray:
    """An image (C, H, W) in [0, 1] as imshow takes it: (H, W) for one channel (or the mean
    of channels other than 3), (H, W, 3) for three."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    return image.transpose(1, 2, 0) if image.shape[0] == 3 else image.mean(axis=0)


def amplified(delta: np.ndarray) -> tuple[np.ndarray, float]:
    """``(0.5 + gain * delta, gain)``: the perturbation stretched to the full range [0, 1]
    (0 is mid-grey), ``gain = 0.5 / max |delta|``."""
    peak = float(np.abs(delta).max())
    gain = 0.5 / peak if peak > 0 else 1.0
    return 0.5 + gain * delta, gain


def plot_pictures(rows: list[dict[str, Any]], norm: str, path: str | os.PathLike) -> None:
    """One row per image (easiest first): the clean image, the adversarial example and the
    perturbation amplified to the full range, titled with the test-set index and the label,
    the attack and ``label -> prediction``, and the perturbation's norm (and its gain)."""
    fig = Figure(figsize=(7.2, 2.5 * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for ax, r in zip(axes, rows):
        delta, gain = amplified(r["x_adv"] - r["x"])
        titles = [f"#{r['index']}: label {r['label']}",
                  f"{r['attack']}: {r['label']} -> {r['pred_adv']}",
                  f"{NORM_LABEL.get(norm, norm)} = {r['distance']:.4g} (x{gain:.3g})"]
        for a, image, title in zip(ax, (r["x"], r["x_adv"], delta), titles):
            shown = displayed(image)
            a.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1,
                     interpolation="nearest")
            a.set_title(title, fontsize="small")
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f"{norm}: clean, adversarial at the best known distance, perturbation "
                 "(amplified)", fontsize="medium")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)


def table(results: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` of the pictured images, one row each (by test-set index):
    ``index``, ``label``, ``clean_pred``, ``image`` (H, W[, 3] uint8), then per norm with
    pictures ``adv_pred_<norm>`` and ``adv_<norm>`` (the example; None where the image is
    not pictured in that norm), each attack's distance, ``best_<norm>`` (the best known
    distance) and ``certified_<norm>`` (with the Lipschitz analysis); +inf is None."""
    files = results["files"]
    with np.load(files["pictures"]) as p, np.load(files["distances"]) as d:
        pictures, distances = dict(p), dict(d)
    norms = [n.value for n in Norm if len(pictures.get(f"{n.value}_index", ()))]
    by_index: dict[int, dict[str, Any]] = {}
    for norm in norms:
        for i, index in enumerate(pictures[f"{norm}_index"].tolist()):
            row = by_index.setdefault(index, {
                "index": index, "label": int(pictures[f"{norm}_label"][i]),
                "clean_pred": int(pictures[f"{norm}_clean_pred"][i]),
                "image": _uint8(pictures[f"{norm}_x"][i])})
            row[f"adv_pred_{norm}"] = int(pictures[f"{norm}_pred_adv"][i])
            row[f"adv_{norm}"] = _uint8(pictures[f"{norm}_x_adv"][i])
    position = {int(index): i for i, index in enumerate(distances["indices"].tolist())}
    best = {f"best_{n.value}": f"ensemble_{n.value}" for n in Norm}
    certified = {f"certified_{n.value}": f"certified_{n.value}" for n in Norm}
    key = {a: a for a in results["attacks"]} | best | certified  # column -> distances.npz
    numbers = [c for c in key if key[c] in distances]
    columns = ["index", "label", "clean_pred", "image",
               *(f"{k}_{norm}" for norm in norms for k in ("adv_pred", "adv")), *numbers]
    rows = []
    for index in sorted(by_index):
        row = by_index[index]
        for c in numbers:
            value = float(distances[key[c]][position[index]])
            row[c] = value if np.isfinite(value) else None
        rows.append([row.get(c) for c in columns])
    return columns, rows


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.round(255 * displayed(image)).astype(np.uint8)


def log_pictures(logger: Logger, results: Mapping[str, Any]) -> None:
    """On W&B (nothing for another logger, or without pictures): each norm's figure as a
    ``wandb.Image`` (``test/attack_pictures_<norm>``) and the table of the pictured images
    (``test/images``, ``table``, its images as ``wandb.Image``)."""
    files = results.get("files", {})
    if not isinstance(logger, WandbLogger) or "pictures" not in files:
        return
    import wandb

    for norm in Norm:
        if f"pictures_{norm.value}" in files:
            logger.log_image(f"test/attack_pictures_{norm.value}",
                             images=[files[f"pictures_{norm.value}"]])
    columns, rows = table(results)
    rows = [[wandb.Image(v) if isinstance(v, np.ndarray) else v for v in row] for row in rows]
    logger.log_table("test/images", columns=columns, data=rows)
