"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half.

Every file lipexp writes into a run folder (results.json, distances.npz, CSVs, figures,
reports) goes through ``atomic_path``: write to a temporary file in the same folder, then
``os.replace`` it over the target (atomic on POSIX file systems).
"""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


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


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON at ``path``, flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)``; the temporary name ends in .npz, so numpy keeps it."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
