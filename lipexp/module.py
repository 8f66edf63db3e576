"""The LightningModule: a network (model + head) trained with a composed defence."""

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

Perturbation = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model, x, y) -> x_adv
Objective = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


class RobustClassifier(pl.LightningModule):
    """``net = head(model(x))`` trained on ``objective(net, perturb(net, x, y), y)``.

    ``perturb`` is the adversarial training step (J0/J1/J2) and ``objective`` the loss with
    its optional Lipschitz penalty (see ``lipexp.defences``); the module only composes them.
    ``config`` (the resolved run config) and ``provenance`` (versions, lipexp commit) are
    stored in every checkpoint, so a checkpoint alone says how it was made.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        perturb: Perturbation,
        objective: Objective,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        config: dict | None = None,
        provenance: dict | None = None,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(model, head)
        self.perturb, self.objective = perturb, objective
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.config, self.provenance = config, provenance
        # Clean loss and accuracy of the val/test splits, accumulated exactly (float64, summed
        # over the whole split and over ranks) rather than averaged per batch in float32.
        self.eval_metrics = nn.ModuleDict(
            {f"{s}_{m}": MeanMetric().set_dtype(torch.float64) for s in ("val", "test")
             for m in ("loss", "acc")}
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x_adv = self.perturb(self.net, x, y)
        loss, logs = self.objective(self.net, x_adv, y)
        for name, value in logs.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "acc"), batch_size=len(y))
        return loss

    def on_train_epoch_start(self) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def _evaluate(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        x, y = batch
        logits = self.net(x)
        loss, acc = self.eval_metrics[f"{split}_loss"], self.eval_metrics[f"{split}_acc"]
        loss.update(F.cross_entropy(logits, y, reduction="none"))
        acc.update((logits.argmax(dim=1) == y).double())
        self.log(f"{split}/loss", loss, batch_size=len(y))
        self.log(f"{split}/acc", acc, prog_bar=True, batch_size=len(y))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer(self.parameters())
        if self.make_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.make_scheduler(optimizer)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lipexp_config"] = self.config
        checkpoint["lipexp_provenance"] = self.provenance  # the code that trained it
