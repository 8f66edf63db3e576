"""Reading a lipexp checkpoint back: the network's weights and the config that made them."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lipexp.deprecations import upgrade_run_config


@dataclass(frozen=True)
class RunCheckpoint:
    path: Path
    config: dict[str, Any]  # the resolved run config, with today's targets and keys
    state_dict: dict[str, torch.Tensor]  # the LightningModule's
    epoch: int | None
    global_step: int | None
    provenance: dict[str, Any] | None  # the code that trained it


def load_run_checkpoint(path: str | Path) -> RunCheckpoint:
    """The checkpoint at ``path`` (on the CPU); FileNotFoundError or ValueError with the path
    and what is wrong when it is missing or not a lipexp checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "lipexp_config" not in checkpoint:
        raise ValueError(f"{path} has no lipexp_config: not a lipexp checkpoint")
    return RunCheckpoint(
        path=path.resolve(),
        config=upgrade_run_config(checkpoint["lipexp_config"]),
        state_dict=checkpoint["state_dict"],
        epoch=checkpoint.get("epoch"),
        global_step=checkpoint.get("global_step"),
        provenance=checkpoint.get("lipexp_provenance"),
    )
