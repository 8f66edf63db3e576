"""The command ``lipexp lipschitz data``: the Lipschitz constant of a data set's training or
test split (lipexp.lipschitz.data_constant), from the config composed as run.py composes it,
written as a JSON record, and its one-line summary."""

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lipexp.data.sources import ImageArrays
from lipexp.lipschitz.data_constant import DEFAULT_MEMORY, SPLITS, data_constant


def compose(overrides: Sequence[str]):
    """The run config for ``overrides``, composed from the repository's conf/ as run.py
    does, with Hydra's node (for the chosen data option)."""
    from lipexp.config.root import compose as compose_root

    return compose_root("config", overrides, return_hydra_config=True)


def load_arrays(cfg) -> ImageArrays:
    """Both splits of ``cfg.data`` through its loader (``data_dir``, ``download``)."""
    from hydra.utils import instantiate

    return instantiate(cfg.data.source)(cfg.data.data_dir, cfg.data.download)


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def run(overrides: Sequence[str] = (), split: str = "train", block: int | None = None,
        out: str | Path | None = None, device: str | None = None,
        memory: int = DEFAULT_MEMORY) -> tuple[dict, Path]:
    """``lipexp lipschitz data``: the data set's constant; the record written as JSON to
    ``out`` (default ``lipschitz_data_<data>_<split>.json`` in the current folder) and
    its path. Raises DataNotFoundError, Hydra's and OmegaConf's errors, ValueError."""
    from lipexp.files import write_json_atomic

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = compose(overrides)
    name = str(cfg.hydra.runtime.choices.get("data", "data"))
    start = time.perf_counter()
    arrays = load_arrays(cfg)
    loaded = time.perf_counter()
    result = data_constant(arrays, split, block=block, device=device, memory=memory)
    seconds = time.perf_counter() - loaded
    first, second = ("train", "train") if split == "train" else ("test", "train")
    pair = None if result.pair is None else [
        {"split": s, "index": k, "label": y}
        for s, k, y in zip((first, second), result.pair, result.labels, strict=True)]
    record = {
        "data": name,
        "split": split,
        "overrides": list(overrides),
        "n_images": {"train": len(arrays.train_x), "test": len(arrays.test_x)},
        "constant": result.constant,
        "distance": _finite(result.distance),
        "squared_distance": _finite(result.squared_distance),
        "pair": pair,
        "ties": result.ties,
        "duplicates_excluded": {
            "count": result.duplicates,
            "splits": [first, second],
            "examples": [list(p) for p in result.duplicate_examples],
        },
        "pairs_examined": result.pairs,
        "candidates_recomputed": result.candidates,
        "block": result.block,
        "device": result.device,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "load_seconds": loaded - start,
        "precision": (
            "candidates screened with float32 products ||a||^2 + ||b||^2 - 2 a.b (TF32 off) "
            "and a proven rounding margin; the minimum recomputed exactly in "
            + ("int64 on the uint8 pixels" if result.exact == "int64" else "float64")),
        "definition": "L = 1 / min ||x1 - x2||_2 over differently labelled, non-identical "
                      "pairs, pixels in [0, 1], one-hot labels (l2 -> l-infinity)",
        "torch": torch.__version__,
    }
    path = Path(out) if out is not None else Path(f"lipschitz_data_{name}_{split}.json")
    write_json_atomic(path, record)
    return record, path


def summary_line(record: dict) -> str:
    """One line: ``mnist train: L = ... (smallest distance d between train[i] (label a) and
    train[j] (label b)); k duplicate pairs excluded; s s``."""
    head = f"{record['data']} {record['split']}"
    dups = record["duplicates_excluded"]["count"]
    tail = f"{dups} duplicate pair{'s' if dups != 1 else ''} excluded; {record['seconds']:.1f} s"
    if record["pair"] is None:
        return f"{head}: L = 0 (no differently labelled pair of distinct images); {tail}"
    p, q = record["pair"]
    ties = record["ties"]
    tie = f", {ties - 1} more pair{'s' if ties > 2 else ''} at that distance" if ties > 1 else ""
    return (f"{head}: L = {record['constant']:.6g} (smallest distance {record['distance']:.6g}"
            f" between {p['split']}[{p['index']}] (label {p['label']}) and "
            f"{q['split']}[{q['index']}] (label {q['label']}){tie}); {tail}")
