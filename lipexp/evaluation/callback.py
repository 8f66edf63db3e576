"""The Lightning callback that ends every training run with the robustness evaluation."""

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from lipexp.attacks.threat import Norm
from lipexp.evaluation.evaluate import Evaluation, evaluate, write_outputs

log = logging.getLogger(__name__)


class RobustnessEvaluation(pl.Callback):
    """At the end of training, evaluate the final network on the first ``n_images`` test images
    with every attack; write error_curves.csv/png and distances.npz into ``output_dir``, log
    the numbers, and keep them in ``self.results`` for results.json.

    Skipped under ``fast_dev_run`` (a smoke test of the training loop).
    """

    def __init__(self, attacks: dict[str, Any], output_dir: str, n_images: int | None = None,
                 batch_size: int = 500, error_at_l2: list[float] = (0.0, 0.1, 0.5, 1.5),
                 error_at_linf: list[float] = (2 / 255, 8 / 255), grid_points: int = 100,
                 bf16: bool = False) -> None:
        self.attacks, self.output_dir = dict(attacks), Path(output_dir)
        self.n_images, self.batch_size, self.grid_points, self.bf16 = (
            n_images, batch_size, grid_points, bf16)
        self.error_at = {Norm.l2: list(error_at_l2), Norm.linf: list(error_at_linf)}
        self.results: dict[str, Any] | None = None  # rank 0 only
        self.done = False  # on every rank, once run() has finished

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end, not on_fit_end: the model is still on its device and, under DDP,
        # the process group is up (the strategy's teardown comes before on_fit_end).
        if trainer.fast_dev_run:
            log.info("fast_dev_run: robustness evaluation skipped")
            return
        self.run(pl_module, trainer.datamodule, trainer.logger)

    def run(self, pl_module: pl.LightningModule, datamodule: Any, logger: Any = None
            ) -> dict | None:
        """Evaluate ``pl_module.net`` on ``datamodule``'s test split; returns the results
        (on rank 0; other data-parallel ranks attack their share and return None)."""
        x, y = datamodule.test_set()
        n = len(x) if self.n_images is None else min(self.n_images, len(x))
        log.info("robustness evaluation: %d images, attacks %s", n, list(self.attacks))
        evaluation = evaluate(pl_module.net, x[:n], y[:n], self.attacks,
                              error_at_sizes=self.error_at, batch_size=self.batch_size,
                              grid_points=self.grid_points, bf16=self.bf16)
        self.done = True
        if evaluation is None:  # not rank 0
            return None
        evaluation.results["files"] = write_outputs(evaluation, self.output_dir)
        if logger:
            log_evaluation(logger, evaluation)
        self.results = evaluation.results
        return self.results


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat ``test/...`` summary numbers of an evaluation, for any logger."""
    out = {"test/clean_error": results["clean_error"]}
    for name, a in results["attacks"].items():
        if "median" in a:
            out[f"test/{name}_median"] = a["median"]
        out |= {f"test/{name}_error@{size}": err for size, err in a["error_at"].items()}
    for stat, values in results["stability"].items():
        if isinstance(values, dict):
            out |= {f"test/{stat}_{k}": v for k, v in values.items()}
    return out


def log_evaluation(logger: Any, evaluation: Evaluation) -> None:
    """Summary numbers to any logger; on W&B also the curves as a table and the figure."""
    logger.log_metrics(metrics(evaluation.results))
    if isinstance(logger, WandbLogger):  # W&B's richer types have no generic Lightning API
        rows = [[name, a["norm"], eps, err] for name, a in evaluation.results["attacks"].items()
                if "curve" in a for eps, err in zip(a["curve"]["eps"], a["curve"]["error"])]
        logger.log_table("test/error_curves", columns=["attack", "norm", "eps", "error"],
                         data=rows)
        logger.log_image("test/error_curves_plot", images=[evaluation.results["files"]["figure"]])
        for key, value in metrics(evaluation.results).items():
            logger.experiment.summary[key] = value
