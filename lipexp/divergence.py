"""Divergence: training stops at the first non-finite loss or gradient, with a message.

A run whose loss became NaN or infinite would otherwise train on (every later step is NaN
too), be evaluated, and could be recorded ``completed`` with NaN numbers. Lightning has no
such check for the loss and the gradients together (``detect_anomaly`` is a debugging mode
that slows every step several times), hence this callback.
"""

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient more often than allowed."""


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """The names of the parameters and buffers of ``module`` that hold a NaN or infinity."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, t in tensors
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class DivergenceMonitor(pl.Callback):
    """Check the loss and the gradients of every training step before the optimizer uses them.

    A step whose loss or gradient norm is NaN or infinite is skipped (every gradient set to
    None, so SGD leaves the weights, the momentum and the weight decay untouched) as long
    as no more than ``patience`` such steps come in a row; the next one stops training with
    ``DivergenceError``, which names the step, the loss terms and the likely causes. With
    the default ``patience=0`` the first non-finite step stops the run: no weight is ever
    updated by a non-finite gradient, so the last checkpoint holds finite weights.

    The check costs one device-to-host copy of two numbers per step. Under data-parallel
    training the gradients are the same on every rank after their all-reduce, so every
    rank takes the same decision.
    """

    def __init__(self, patience: int = 0) -> None:
        if patience < 0:
            raise ValueError(f"callbacks.divergence.patience must be >= 0, got {patience}")
        self.patience = patience
        self.in_a_row = 0  # consecutive non-finite steps
        self.skipped = 0  # all skipped steps of this run
        self._loss: torch.Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None:
            grads = []  # fp16's GradScaler skips overflowing steps itself: check the loss only
        norms = torch.stack(torch._foreach_norm(grads)) if grads else torch.zeros(1)
        loss = self._loss if self._loss is not None else torch.zeros(())
        finite = torch.isfinite(loss).all() & torch.isfinite(norms.to(loss.device)).all()
        if bool(finite):  # the one synchronization of the check
            self.in_a_row = 0
            return
        self.in_a_row += 1
        poisoned = nonfinite_parameters(pl_module) if pl_module is not None else []
        if self.in_a_row > self.patience or poisoned:  # e.g. BatchNorm's running statistics
            raise DivergenceError(self._message(trainer, loss, norms)
                                  + (f"; non-finite buffers: {', '.join(poisoned[:3])}"
                                     if poisoned else ""))
        self.skipped += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row, "
                    "callbacks.divergence.patience=%d)", trainer.global_step, self.in_a_row,
                    self.patience)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # SGD skips parameters without a gradient

    def _message(self, trainer: pl.Trainer, loss: torch.Tensor, norms: torch.Tensor) -> str:
        terms = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("train/") and isinstance(v, torch.Tensor) and v.numel() == 1}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(terms.items()))
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        config: dict[str, Any] = getattr(trainer.lightning_module, "config", None) or {}
        lam = (config.get("lip") or {}).get("lam")
        causes = f"the learning rate (lr {lr:.4g}: optimizer.lr / recipe.lr) is too large"
        if lam:
            causes += f", or the penalty weight (lip.lam={lam:.4g})"
        what = "gradient" if bool(torch.isfinite(loss).all()) else "loss"
        return (f"training diverged: non-finite {what} at step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch "
                f"{trainer.fit_loop.epoch_loop.batch_idx}): loss {float(loss):.4g}, largest "
                f"gradient norm {float(norms.max()):.4g}; logged terms: {shown or 'none'}. "
                f"Likely cause: {causes}. The checkpoints hold the last finite weights; "
                "nothing was evaluated")
