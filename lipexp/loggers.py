"""The lifetime of a run's logger."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pytorch_lightning.loggers import WandbLogger


@contextmanager
def closing_logger(logger: Any) -> Iterator[Any]:
    """Close the logger when the block ends, successfully or not.

    W&B keeps one run per process open until ``wandb.finish``: without it the next job of a
    sweep would log into this one's run. The exit code marks a failed run as such.
    """
    ok = False
    try:
        yield logger
        ok = True
    finally:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish(exit_code=0 if ok else 1)
