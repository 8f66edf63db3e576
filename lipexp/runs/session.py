"""The one lifecycle of work in a run folder, for training and re-evaluation alike.

In order: the folder's lock (``RunFolder.owned``: one process per folder), the command's
checks against what the folder holds (``check``: may answer with a completed run's results,
or refuse with a RunFolderError), the record of the command (``.hydra/``, written only now:
a refused command leaves the folder's record alone), the log file ``run.log``, the signal
handlers (``GracefulStop``: Ctrl-C, SIGTERM, SLURM's SIGUSR1), and results.json from
``running`` to its final status (``RunFolder.record``). Nothing is written before the checks
pass; data-parallel ranks other than 0 (``write=False``) write nothing.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lipexp.runs.folder import RunFolder
from lipexp.runs.stopping import GracefulStop


@dataclass
class Session:
    """What the block of ``session`` gets: ``results``, the dict results.json holds (the
    block adds its numbers), and ``done``: True when the folder already held the answer
    (``check`` returned a completed run's results: nothing to do, nothing was written)."""

    results: dict[str, Any]
    done: bool


@contextmanager
def session(folder: RunFolder, entries: Mapping[str, Any], *,
            check: Callable[[RunFolder], dict[str, Any] | None], record: Any,
            stop: GracefulStop, overrides: list[str] | None = None,
            completed: Callable[[dict[str, Any]], None] | None = None,
            write: bool = True) -> Iterator[Session]:
    """Hold ``folder`` for the block and record its work (the order in the module docstring).

    ``entries``: results.json's first entries (config, provenance, ...). ``check(folder)``:
    run with the lock held; returns the results of a run that needs no work (the block then
    gets ``done=True`` and should return them) or None; raises to refuse. ``record``: the
    command's config for ``.hydra/config.yaml`` (``overrides``: its overrides.yaml when no
    Hydra job records them). ``stop``: its handlers are installed for the whole block, so a
    signal before training starts is recorded as well. ``completed(results)``: called once
    results.json says ``completed``, its log records still in run.log (where to find things).
    """
    with folder.owned(write=write):
        previous = check(folder)
        if previous is not None:
            yield Session(previous, done=True)
            return
        if write:
            folder.save_hydra_record(record, overrides)
        with folder.log_file(write=write):
            with stop.handling(), folder.record(dict(entries), write=write) as results:
                yield Session(results, done=False)
            if completed is not None:
                completed(results)
