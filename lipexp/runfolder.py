"""A run folder's state, recorded in its results.json.

A folder belongs to the command that named it (conf/hydra/default.yaml): a completed run is
not run again, an unfinished one continues only with ``resume=true``, and nothing in it is
overwritten otherwise. While work is under way results.json says ``running``; it ends as
``completed`` or, with the error, ``failed`` (``RunFolder.record``, used by training and by
``mode=eval`` alike). Every write is atomic.
"""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lipexp.files import write_json_atomic
from lipexp.provenance import now

log = logging.getLogger(__name__)


class RunFolderError(RuntimeError):
    """The run folder holds a run that this command would overwrite or cannot resume."""


def read_results(path: str | Path) -> dict[str, Any] | None:
    """The results.json at ``path``, or None if there is none (or it is not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class RunFolder:
    """``path/results.json`` and ``path/checkpoints/last.ckpt`` of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results = self.path / "results.json"
        self.last = self.path / "checkpoints" / "last.ckpt"

    def completed_results(self, resume: bool) -> dict[str, Any] | None:
        """The results of a completed run in this folder, or None when there is work to do;
        RunFolderError for an unfinished run without ``resume``, or ``resume`` without one."""
        previous = read_results(self.results)
        if previous is not None and previous.get("status") == "completed":
            log.info("%s is already completed; nothing to do (delete it to run again)",
                     self.path)
            return previous
        if resume and not self.last.exists():
            raise RunFolderError(f"resume=true but there is no {self.last} to resume from")
        if not resume and self.last.exists():
            raise RunFolderError(
                f"{self.path} holds an unfinished run ({self.last}); pass resume=true to "
                "continue it, or delete the folder to start again")
        return None

    def resume_checkpoint(self, resume: bool) -> str | None:
        """The checkpoint that ``trainer.fit`` continues from: last.ckpt with ``resume``."""
        return str(self.last) if resume else None

    @contextmanager
    def record(self, entries: dict[str, Any], write: bool = True) -> Iterator[dict[str, Any]]:
        """Record the work done inside the block in results.json.

        Yields the results dict, ``{"status": "running", **entries, "started": ...}``, written
        at once; the block adds its numbers to it. On leaving: ``status: completed``, or on
        any exception (KeyboardInterrupt included) ``status: failed`` with the error, which is
        then re-raised; ``finished`` in both cases. ``write=False`` (data-parallel ranks
        other than 0) records nothing.
        """
        results: dict[str, Any] = {"status": "running", **entries, "started": now()}
        if write:
            write_json_atomic(self.results, results)
        try:
            yield results
        except BaseException as e:  # recorded, then re-raised: the folder says why it stopped
            results.update(status="failed", error=f"{type(e).__name__}: {e}", finished=now())
            raise
        else:
            results.update(status="completed", finished=now())
        finally:
            if write:
                write_json_atomic(self.results, results)
