"""A run folder's state and its rules.

A folder belongs to the command that named it (conf/hydra/default.yaml) and to one process
at a time (``RunFolder.owned``: a lock file naming the owner). A completed run is not run
again, and a different config is refused rather than answered with the old numbers; an
unfinished run continues only with ``resume=true`` (or after a SLURM requeue) and only
with the config it was started with (``config_differences``). Nothing in the folder is
written before these checks pass, Hydra's ``.hydra/`` record included
(``save_hydra_record``). While work is under way results.json says ``running``; it ends as
``completed``, ``interrupted`` (Ctrl-C), ``terminated`` (SIGTERM) or ``failed`` with the
error (``RunFolder.record``, used by training and evaluation alike). Every write is
atomic.
"""

import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from lipexp.config.overrides import reevaluate_command
from lipexp.files import atomic_path, write_json_atomic
from lipexp.runs.differences import config_differences
from lipexp.runs.provenance import now
from lipexp.runs.stopping import stop_status
from lipexp.version import __version__

log = logging.getLogger(__name__)
T = TypeVar("T")

class RunFolderError(RuntimeError):
    """The run folder holds a run that this command would overwrite, change or cannot resume,
    or another process owns it."""


def read_results(path: str | Path) -> dict[str, Any] | None:
    """The results.json at ``path``, or None if there is none (or it is not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _read_lock(fd: int) -> dict[str, Any]:
    """The owner recorded in an open lock file (empty if none or unreadable)."""
    try:
        owner = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (json.JSONDecodeError, OSError):
        return {}
    return owner if isinstance(owner, dict) else {}


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunFolder:
    """``path/results.json``, ``path/checkpoints/`` and the owner's ``path/.lock``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results = self.path / "results.json"
        self.last = self.path / "checkpoints" / "last.ckpt"  # every epoch
        self.lock = self.path / ".lock"

    # ------------------------------------------------------------------ owner

    @contextmanager
    def owned(self, write: bool = True) -> Iterator[None]:
        """Hold the folder's lock for the block: an exclusive ``flock`` on ``.lock``, which
        names the owner (host, pid, start, command).

        A second process on the same folder gets ``RunFolderError`` naming the owner. The
        operating system releases the lock when its process ends, however it ends (SIGKILL,
        a node that went down): a ``.lock`` that names a process but is not locked is
        stale, and is taken over with a warning. ``write=False`` (data-parallel ranks other
        than 0, whose rank 0 holds the lock) does nothing.
        """
        if not write:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": now(),
              "command": " ".join(sys.argv)}
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_lock(fd)
                os.close(fd)
                raise RunFolderError(
                    f"{self.path} is in use by process {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')} since {owner.get('since', '?')} "
                    f"({owner.get('command', '?')}); wait for it to finish") from None
            try:  # the file we locked must still be the folder's lock (not unlinked by its
                same = os.stat(self.lock).st_ino == os.fstat(fd).st_ino  # last owner)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            previous = _read_lock(fd)
            if previous.get("pid") is not None:
                log.warning("%s: taking over the lock of process %s on %s, which ended without "
                            "releasing it (%s)", self.path, previous.get("pid"),
                            previous.get("host"), previous.get("command"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            yield
        finally:
            self.lock.unlink(missing_ok=True)  # before unlocking: no one locks a stale file
            os.close(fd)  # releases the flock

    def busy(self) -> bool:
        """Whether a live process holds the folder's lock (``owned``) now."""
        try:
            fd = os.open(self.lock, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def killed(self) -> bool:
        """Whether the run recorded here as ``running`` is gone: its lock names a process of
        this host that no longer exists (killed with SIGKILL, or the machine went down),
        so results.json could not be updated."""
        owner = read_results(self.lock) or {}
        return (owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)
                and not alive(owner["pid"]))

    # ------------------------------------------------------------------ checks

    def checkpoints(self) -> list[Path]:
        """The checkpoints a resumed run may start from, newest last: ``checkpoints/*.ckpt``
        (last.ckpt every epoch, step.ckpt every ``callbacks.steps.every_n_train_steps``) and
        the ``hpc_ckpt_*.ckpt`` Lightning writes on a SLURM requeue signal; best.ckpt is
        not one (it may be older)."""
        found = [*self.path.glob("checkpoints/*.ckpt"), *self.path.glob("hpc_ckpt_*.ckpt")]
        found = [p for p in found if p.name != "best.ckpt" and p.is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns)

    def completed_results(self, resume: bool,
                          config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The results of a completed run in this folder, or None when there is work to do.

        RunFolderError, with what to do, for: a completed run or an unfinished one whose
        config differs from ``config`` (the resolved config of this command) in anything
        but the ``CHANGEABLE`` settings (a completed run that differs in its evaluation
        settings only is returned, with a warning: ``lipexp eval`` re-evaluates it); an
        unfinished run without ``resume``; ``resume`` without a checkpoint.
        """
        previous = read_results(self.results)
        recorded = previous.get("config") if isinstance(previous, dict) else None
        if config is not None and isinstance(recorded, dict):
            version = (previous.get("provenance") or {}).get("lipexp")
            changed = config_differences(recorded, config, older_version=version != __version__)
            evaluation_only = all(c.split(":")[0].split(".")[0] in ("attacks", "eval")
                                  for c in changed)
            if changed and evaluation_only and previous.get("status") == "completed":
                # trained as this command would train it: the run stands, with its numbers
                log.warning("%s is already completed, evaluated with other settings (this "
                            "command: %s); its results stand. To evaluate it again with "
                            "these settings: %s, with them as overrides (eval.KEY=..., "
                            "attacks=[...])", self.path, "; ".join(changed),
                            reevaluate_command(self.path))
                return previous
            if changed:
                what = ("completed" if previous.get("status") == "completed" else
                        "unfinished")
                raise RunFolderError(
                    f"{self.path} holds a {what} run with another config; this command "
                    f"differs in: {'; '.join(changed)}. Use another folder (hydra.run.dir=...),"
                    " or delete this one to start again")
        if previous is not None and previous.get("status") == "completed":
            log.info("%s is already completed; nothing to do (delete it to run again)",
                     self.path)
            return previous
        found = self.checkpoints()
        if resume and not found:
            raise RunFolderError(f"resume=true but there is no {self.last} to resume from")
        if not resume and found:
            raise RunFolderError(
                f"{self.path} holds an unfinished run ({found[-1]}); pass "
                "resume=true to continue it, or delete the folder to start again")
        return None

    def resume_checkpoint(self, resume: bool) -> str | None:
        """The checkpoint that ``trainer.fit`` continues from with ``resume``: the newest that
        reads as a checkpoint (``newest_checkpoint``)."""
        from lipexp.runs.checkpoint import read_checkpoint  # imports torch

        def readable(path: Path) -> str:
            read_checkpoint(path)  # CheckpointError if it does not read
            return str(path)

        return self.newest_checkpoint(readable) if resume else None

    def final_checkpoint(self, read: Callable[[Path], T]) -> T:
        """``read`` of a completed run's final weights, ``checkpoints/last.ckpt``; else of the
        newest readable checkpoint (file times can mislead in a copied folder: a completed
        run's last.ckpt is the one it evaluated). What ``lipexp eval RUN_DIR`` and
        ``lipexp.load_run`` take."""
        results = read_results(self.results) or {}
        if results.get("status") == "completed" and self.last.is_file():
            return read(self.last)
        return self.newest_checkpoint(read)

    def newest_checkpoint(self, read: Callable[[Path], T]) -> T:
        """``read(path)`` of the newest of ``checkpoints()`` that ``read`` accepts (a
        reader of lipexp.runs.checkpoint): a damaged one is skipped with a warning; none readable,
        or none at all, is a RunFolderError naming them."""
        from lipexp.runs.checkpoint import CheckpointError  # imports torch

        damaged = []
        for path in reversed(self.checkpoints()):
            try:
                checkpoint = read(path)
            except CheckpointError as e:
                damaged.append(str(e))
                continue
            for message in damaged:  # said only when an older checkpoint is taken
                log.warning("%s: taking an older checkpoint", message)
            return checkpoint
        raise RunFolderError(f"{self.path}: no readable checkpoint "
                             f"({'; '.join(damaged) or 'none in checkpoints/'})")

    # ------------------------------------------------------------------ records

    def save_hydra_record(self, cfg: Any, overrides: list[str] | None = None) -> None:
        """The record of the command, ``.hydra/{config,hydra,overrides}.yaml`` (``cfg`` is its
        config), written here once the folder's checks have passed: conf/hydra/default.yaml
        turns Hydra's own writing off, which comes before any check, so that a refused
        command cannot overwrite the record of the folder's run. In a Hydra job, Hydra's
        config and the job's overrides; outside one (``lipexp eval``), ``overrides`` and no
        hydra.yaml."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        records = {"config.yaml": OmegaConf.create(cfg) if not OmegaConf.is_config(cfg)
                   else cfg}
        if HydraConfig.initialized():
            hydra = HydraConfig.get()
            records["hydra.yaml"] = OmegaConf.create({"hydra": hydra})
            overrides = list(hydra.overrides.task) if overrides is None else overrides
        records["overrides.yaml"] = OmegaConf.create(list(overrides or []))
        for name, node in records.items():
            with atomic_path(self.path / ".hydra" / name) as tmp:
                OmegaConf.save(node, tmp)

    @contextmanager
    def log_file(self, write: bool = True) -> Iterator[None]:
        """Python's log records of the block also go to ``run.log`` in the folder (in Hydra's
        format), opened only now, after the folder's checks. ``write=False``: not."""
        if not write:
            yield
            return
        handler = logging.FileHandler(self.path / "run.log")
        handler.setFormatter(logging.Formatter(
            "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            handler.close()

    @contextmanager
    def record(self, entries: dict[str, Any], write: bool = True) -> Iterator[dict[str, Any]]:
        """Record the work done inside the block in results.json.

        Yields the results dict, ``{"status": "running", **entries, "started": ...}``, written
        at once; the block adds its numbers to it. On leaving: ``status: completed``, or on
        an exception the status of ``stop_status`` (``interrupted``, ``terminated`` or
        ``failed``) with the error and, when a checkpoint exists, how to continue; the
        exception is then re-raised. ``finished`` in every case. ``write=False``
        (data-parallel ranks other than 0) records nothing.
        """
        results: dict[str, Any] = {"status": "running", **entries, "started": now()}
        if write:
            write_json_atomic(self.results, results)
        try:
            yield results
        except BaseException as e:  # recorded, then re-raised: the folder says why it stopped
            results.update(status=stop_status(e), error=f"{type(e).__name__}: {e}",
                           finished=now())
            if entries.get("mode") != "eval" and (found := self.checkpoints()):
                results["continue"] = f"resume=true continues from {found[-1]}"
            raise
        else:
            results.update(status="completed", finished=now())
        finally:
            if write:
                write_json_atomic(self.results, results)
