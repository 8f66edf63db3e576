"""Ctrl-C and SIGTERM stop a training run at the next step boundary, its state saved.

Python's default turns Ctrl-C into a KeyboardInterrupt wherever the program is (Lightning
then exits with ``SystemExit: 1``), and SIGTERM ends the process without a word. Here the
first signal during training is noted; the run stops after the step under way, writes
its complete state (``checkpoints/step.ckpt``: weights, optimizer, loops, generators,
position in the epoch), and raises ``Interrupted`` (SIGINT) or ``Terminated`` (SIGTERM),
which results.json records as ``interrupted`` / ``terminated``; ``resume=true`` continues
exactly from there. A second Ctrl-C, or a signal outside the training steps (validation,
the robustness evaluation), stops at once. Under SLURM, SIGUSR1 (sent before preemption or
the time limit) stops the same way, then requeues the job, which resumes exactly.
"""

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl

from lipexp.errors import Interrupted, Requeued, Stopped, Terminated

log = logging.getLogger(__name__)

STOPS: dict[int, type[Stopped]] = {signal.SIGINT: Interrupted, signal.SIGTERM: Terminated,
                                   signal.SIGUSR1: Requeued}


def _signals() -> list[int]:
    """The signals handled: SIGINT and SIGTERM; under SLURM also SIGUSR1, which the SLURM
    launcher asks for shortly before preemption or the time limit (conf/hydra/launcher/
    slurm.yaml). Installed first, it takes the place of Lightning's own SIGUSR1 handler,
    which saves a checkpoint in the middle of a step."""
    return [signal.SIGINT, signal.SIGTERM, *([signal.SIGUSR1] if "SLURM_JOB_ID" in os.environ
                                            else [])]


def requeue() -> None:
    """Ask SLURM to run this job again (``scontrol requeue``); it then continues its folder
    (requeued, below). Global rank 0 only."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:  # an array task is requeued by its own id
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    else:
        job = os.environ["SLURM_JOB_ID"]
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("scontrol requeue %s failed (%s): resume=true continues the run", job, e)
        return
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed: %s; resume=true continues the run", job,
                    done.stderr.strip())


class GracefulStop(pl.Callback):
    """Stops training at a step boundary on SIGINT / SIGTERM, saving the state to
    ``checkpoint``. Its handlers are active inside ``handling()``; list it before the
    evaluation callback, so that a signal noted during the last epoch stops the run before
    the evaluation starts. Under data-parallel training every rank stops after the same
    step (the ranks' notes are combined once per step)."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.pending: int | None = None  # the signal noted, not yet acted on
        self.deferring = False  # inside training: act at the next step boundary

    @contextmanager
    def handling(self) -> Iterator[None]:
        """Install the handlers for the block (main thread only: elsewhere Python keeps its
        own), then put the previous ones back. Lightning's SIGTERM handler, installed
        during ``fit``, calls this one too."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in _signals()}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.deferring and self.pending is None:
            self.pending = signum
            log.warning("%s: training stops after this step, its state saved in %s "
                        "(Ctrl-C again to stop at once, without saving)", name, self.checkpoint)
            return
        if signum == signal.SIGUSR1 and os.environ.get("SLURM_PROCID", "0") == "0":
            requeue()  # outside training (the evaluation): stop now, run again later
        raise STOPS[signum](f"stopped by {name}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.deferring = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        stop = self.pending is not None
        if trainer.world_size > 1:  # any rank's signal stops every rank after this step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        trainer.save_checkpoint(self.checkpoint)
        signum = self.pending if self.pending is not None else signal.SIGTERM
        if signum == signal.SIGUSR1 and trainer.global_rank == 0:
            requeue()
        raise STOPS[signum](
            f"stopped by {signal.Signals(signum).name} after step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}); its state is in {self.checkpoint}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.deferring = False
        stop = self.pending is not None
        if trainer.world_size > 1:  # every rank stops, or none enters the evaluation
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:  # noted after the last step: stop before evaluating
            signum = self.pending if self.pending is not None else signal.SIGTERM
            raise STOPS[signum](
                f"stopped by {signal.Signals(signum).name} after training, before the "
                "robustness evaluation (the final weights are in checkpoints/last.ckpt)")


def requeued() -> bool:
    """Whether this is a SLURM job restarted by a requeue (preemption, time limit): it
    continues its folder as with ``resume=true``."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def stop_status(error: BaseException) -> str:
    """results.json's status for a run that stopped with ``error``: ``interrupted`` for
    Ctrl-C (a KeyboardInterrupt, or the exit Lightning makes of one), ``terminated`` for
    SIGTERM (lipexp's or Lightning's handler), else ``failed``."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, Stopped):
            return seen.status
        if isinstance(seen, KeyboardInterrupt):
            return "interrupted"
        if isinstance(seen, SIGTERMException):
            return "terminated"
        seen = seen.__context__
    return "failed"
