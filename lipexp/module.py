"""The LightningModule: a network (model + head) trained with a composed defence."""

import warnings
from collections.abc import Callable
from time import perf_counter
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

    Speed options (``+model.channels_last=true``, ``+model.compile=true``; docs/configuration.md,
    "Speed"): ``channels_last`` stores the weights and the training batches in NHWC order
    (faster convolutions on tensor cores); ``compile`` trains through ``torch.compile(net)``
    (the weights stay those of ``net``: checkpoints are unchanged). torch.compile cannot
    differentiate twice, so with an objective that needs double backpropagation (the
    exact penalty) it warns and trains uncompiled; the finite-difference penalty's passes
    run on the uncompiled network (lipexp.defences.fd.fd_grad_norms), only
    the J1/J2 step's gradient through the compiled one (except with the shared passes of
    ``lip.reuse_adv_gradient``, compiled throughout). ``full_precision_backward`` (fd):
    the backward pass runs without TensorFloat-32 on CUDA (``finite_difference.tf32_off``).
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
        channels_last: bool = False,
        compile: bool = False,
        full_precision_backward: bool = False,
    ) -> None:
        super().__init__()
        self.full_precision_backward = full_precision_backward
        self.net = nn.Sequential(model, head)
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # The network the training step calls; kept out of the module's children (a plain
        # attribute) so that state_dict and checkpoints hold the weights once, under net.
        self.__dict__["_train_net"] = self.net
        if compile:
            from lipexp.defences.penalty import needs_double_backward

            if needs_double_backward(objective):
                warnings.warn("model.compile=true: torch.compile cannot differentiate twice, "
                              "which the exact Lipschitz penalty (lip.method=exact) needs; "
                              "training runs uncompiled",
                              stacklevel=2)
            else:
                self.__dict__["_train_net"] = torch.compile(self.net)
        self.perturb, self.objective = perturb, objective
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.config, self.provenance = config, provenance
        # Clean loss and accuracy of the val/test splits, accumulated exactly (float64, summed
        # over the whole split and over ranks) rather than averaged per batch in float32.
        self.eval_metrics = nn.ModuleDict(
            {f"{s}_{m}": MeanMetric().set_dtype(torch.float64) for s in ("val", "test")
             for m in ("loss", "acc")}
        )
        # Throughput: wall time between the starts of consecutive training steps (data,
        # transfer, augmentation and compute), so a user sees what a defence costs.
        self._step_started: float | None = None
        self._images_per_s: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """``images/s = B_global / (seconds since the previous step started)``; the first
        step of an epoch has no previous one (validation runs in between)."""
        now = perf_counter()
        if batch_idx == 0 or self._step_started is None:
            self._images_per_s = None
        else:
            world = self.trainer.world_size if self._trainer is not None else 1
            self._images_per_s = len(batch[1]) * world / (now - self._step_started)
        self._step_started = now

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self.__dict__["_train_net"]
        x_adv = self.perturb(net, x, y)
        loss, logs = self.objective(net, x_adv, y)
        for name, value in logs.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "acc"), batch_size=len(y))
        if self._images_per_s is not None:  # all processes together, images per second
            self.log("train/images_per_s", self._images_per_s, prog_bar=True, batch_size=len(y),
                     rank_zero_only=True)
        return loss

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self.full_precision_backward:
            return super().backward(loss, *args, **kwargs)
        from lipexp.precision import tf32_off

        with tf32_off(loss.device):
            super().backward(loss, *args, **kwargs)

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
