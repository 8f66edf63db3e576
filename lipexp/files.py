"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half.

Every file lipexp writes into a run folder (results.json, distances.npz, CSVs, figures,
reports) goes through ``atomic_path``: write to a temporary file in the same folder, then
``os.replace`` it over the target (atomic on POSIX file systems).
"""

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# keys whose null results.json documents (an unbroken median, the gaps computed from one,
# and a median interval's bound: +inf when the resampled medians are unbroken)
EXPLAINED_NULLS = ("median", "median_gap", "reference_median", "median_interval[0]",
                   "median_interval[1]")


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so writers that infer the format
    from it work); on success rename it over ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode any new file gets, so that
    # collaborators on a shared cluster can read a run's results as before the rename
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict_json(data: Any, where: str = "", replaced: list[str] | None = None) -> Any:
    """``data`` with every NaN or infinite float (Python's or numpy's) replaced by None.

    Strict JSON has no NaN or Infinity tokens, and a reader that rejects them (most
    languages' parsers, ``json.loads(..., parse_constant=...)``) must read every file lipexp
    writes. The paths of the replaced numbers are appended to ``replaced``. Where a
    non-finite value means something (a median beyond every attack size), the writer says
    so next to it: an attack's ``median`` is null exactly when more than half its images
    are unbroken, which ``n_unbroken`` counts.
    """
    if isinstance(data, dict):
        return {k: strict_json(v, f"{where}.{k}" if where else str(k), replaced)
                for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(v, f"{where}[{i}]", replaced) for i, v in enumerate(data)]
    if isinstance(data, float | np.floating) and not math.isfinite(data):
        if replaced is not None:
            replaced.append(where)
        return None
    return data


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented, strict JSON at ``path`` (NaN and infinities as null, see
    ``strict_json``), flushed to disk before the rename."""
    replaced: list[str] = []
    strict = strict_json(data, replaced=replaced)
    unexplained = [p for p in replaced if not p.endswith(EXPLAINED_NULLS)]
    if unexplained:
        log.warning("%s: non-finite numbers written as null: %s", path, ", ".join(unexplained))
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(strict, f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)``; the temporary name ends in .npz, so numpy keeps it."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
