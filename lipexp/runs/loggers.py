"""The lifetime of a run's logger."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger

log = logging.getLogger(__name__)


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
        if isinstance(logger, _LightningWandbLogger):
            import wandb

            wandb.finish(exit_code=0 if ok else 1)


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger that does not let a missing network stop a run.

    W&B waits 90 s for its server by default and then fails the run. Here the wait is
    ``init_timeout`` seconds (30); if the server cannot be reached by then, a warning says
    so and the run logs offline, into ``<save_dir>/wandb/offline-run-*`` for a later
    ``wandb sync`` (results.json in the run folder holds the same summary numbers in plain
    JSON). Other arguments: Lightning's ``WandbLogger``.
    """

    def __init__(self, *args: Any, init_timeout: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import wandb

        if "settings" not in self._wandb_init:  # a user's own settings are kept
            self._wandb_init["settings"] = wandb.Settings(init_timeout=init_timeout)

    @property
    def experiment(self) -> Any:
        import wandb

        try:
            return super().experiment
        except wandb.errors.Error as e:
            if self._experiment is not None or self._wandb_init.get("mode") == "offline":
                raise
            log.warning("W&B cannot be reached (%s): this run logs offline into %s/wandb; "
                        "`wandb sync` uploads it later", " ".join(str(e).split())[:200],
                        self.save_dir)
            self._wandb_init["mode"] = "offline"
            return super().experiment
