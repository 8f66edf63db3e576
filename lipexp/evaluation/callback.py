"""The Lightning callback that ends every training run with the robustness evaluation."""

import logging
import os
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

from lipexp.evaluation.runner import Evaluator

log = logging.getLogger(__name__)


class RobustnessEvaluation(pl.Callback):
    """At the end of training, ``evaluator(pl_module.net, trainer.datamodule, output_dir,
    trainer.logger)``, then ``on_done(results)`` on every rank (the results on rank 0, None
    on the other data-parallel ranks): the caller keeps them, the callback does not.

    Skipped under ``fast_dev_run`` (a smoke test of the training loop): no evaluation, no
    ``on_done``.
    """

    def __init__(self, evaluator: Evaluator, output_dir: str | os.PathLike,
                 on_done: Callable[[dict[str, Any] | None], None] | None = None) -> None:
        self.evaluator, self.output_dir, self.on_done = evaluator, output_dir, on_done

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end, not on_fit_end: the model is still on its device and, under DDP,
        # the process group is up (the strategy's teardown comes before on_fit_end).
        if trainer.fast_dev_run:
            log.info("fast_dev_run: robustness evaluation skipped")
            return
        results = self.evaluator(pl_module.net, trainer.datamodule, self.output_dir,
                                 trainer.logger)
        if self.on_done is not None:
            self.on_done(results)
