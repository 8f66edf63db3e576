"""Exact resume: a run continued from any checkpoint ends as if it had never stopped.

Lightning's checkpoint holds the weights, the optimizer, the scheduler and the loops'
progress; two things are missing for a bit-identical continuation, and are added here:

- the random number generators (torch's CPU and CUDA, numpy's, Python's): the
  augmentation, the shuffling and anything else random draw from them. ``RunState``, a
  callback, stores them in every checkpoint and puts them back when training resumes.
- the position inside an epoch: Lightning restores its counters but not the order of the
  data, so a run resumed mid-epoch would see the rest of the epoch in a new order.
  ``ResumableDataLoader``, the training loader, records the generators' states when
  each epoch's iteration starts and how many batches it has given; Lightning stores that
  in the checkpoint (its ``state_dict`` protocol for loaders) and hands it back on resume,
  where the loader replays the same epoch, skips the batches already trained on, and puts
  the generators back to their state at the checkpoint.

Everything stored is plain data and tensors, so checkpoints still load with
``torch.load(weights_only=True)``.
"""

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """The states of every random generator a run draws from, as tensors and plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # this process's device only: under DDP each rank draws from its own GPU's generator
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        # numpy's state as a tensor and numbers (a numpy array would need an unpickler)
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Put every generator back to ``states`` (from ``rng_states``); CUDA's on this
    process's device, where the checkpoint had one."""
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state(states["cuda"][0])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


class RunState(pl.Callback):
    """Every checkpoint carries the generators' states; a resumed run starts from them.

    Saved when the checkpoint is written (after a training step, or at the end of an epoch,
    after validation); restored when Lightning loads the checkpoint, before the loops
    start (Lightning's sanity check runs with its own, isolated generator state).
    """

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict["rng"])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the loader's epoch may be cut short (trainer.limit_train_batches): it must know
        # where its epoch ends, to tell a finished epoch's state from an unfinished one's
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader):
            loader.batches_per_epoch = int(min(len(loader), trainer.num_training_batches))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` for training that resumes mid-epoch exactly.

    ``state_dict()`` (called by Lightning when it writes a checkpoint): the generators'
    states when this epoch's iteration began, the number of batches given since, and the
    generators' states now. After ``load_state_dict``, the next iteration restores the
    first, iterates again (the same order: the same draws), skips the batches already
    given (no augmentation runs for them: it happens after the loader), then restores the
    generators to the checkpoint's state and goes on. A DataLoader subclass with
    DataLoader's arguments, so that Lightning can still give it a distributed sampler.
    """

    _epoch_start: dict[str, Any] | None = None
    _given: int = 0
    _restore: dict[str, Any] | None = None
    batches_per_epoch: int | None = None  # len(self), or less (RunState sets it)

    def __iter__(self) -> Iterator[Any]:
        restore, self._restore = self._restore, None
        if self.num_workers > 0 and self._epoch_start is None:  # once, at the first epoch
            log.warning("data.num_workers=%d: a run resumed mid-epoch will not continue "
                        "exactly (worker seeds); in-memory data sets need no workers",
                        self.num_workers)
        if restore is not None and restore["given"] >= restore["end"]:
            # saved after the epoch's last batch (of len(self), or of a limit): this is the
            # next epoch, which starts afresh from the generators' states at the checkpoint
            set_rng_states(restore["now"])
            restore = None
        if restore is not None:
            set_rng_states(restore["epoch_start"])
        self._epoch_start, self._given = rng_states(), 0
        skip = restore["given"] if restore is not None else 0
        for batch in super().__iter__():
            if self._given < skip:
                self._given += 1
                continue
            if restore is not None:
                set_rng_states(restore["now"])  # where the checkpoint left the generators
                restore = None
            self._given += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        if self._epoch_start is None:  # no epoch started yet: nothing to restore
            return {}
        return {"epoch_start": self._epoch_start, "given": self._given, "now": rng_states(),
                "end": self.batches_per_epoch or len(self)}  # the epoch's last batch

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict or None
