"""Reading a lipexp checkpoint back: the network's weights and the config that made them.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only, so a checkpoint from elsewhere cannot run code when it is opened (a
pickle can name any function to call). Everything lipexp and Lightning store is such data.
"""

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipexp.config.compat import upgrade_run_config


class CheckpointError(ValueError):
    """A file that is not a readable lipexp checkpoint; the message names it and says why."""


@dataclass(frozen=True)
class RunCheckpoint:
    path: Path
    config: dict[str, Any]  # the resolved run config, with today's targets and keys
    state_dict: dict[str, torch.Tensor]  # the LightningModule's
    epoch: int | None
    global_step: int | None
    provenance: dict[str, Any] | None  # the code that trained it


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict stored at ``path``, loaded on the CPU as data only; FileNotFoundError or
    CheckpointError, one line naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (or, before PyTorch 1.6, a pickle: protocol byte 0x80)
    if head == b"PK" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated or corrupt (a zip archive without its "
                              "directory, e.g. a copy or a write that did not finish)")
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither the zip archive "
                              f"torch.save writes nor a pickle; it starts with {head!r})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: code, not data
        lines = [line.strip() for line in str(e).splitlines()]
        named = [line for line in lines if "GLOBAL" in line or "global" in line.lower()]
        if named:
            raise CheckpointError(
                f"{path}: refused, it holds objects other than tensors and plain data (a "
                f"checkpoint that would run code when loaded): {named[0]}") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({lines[-1][:200]})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as e:
        message = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: truncated or corrupt ({type(e).__name__}: "
                              f"{message})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(checkpoint).__name__},"
                              " not a dict)")
    return checkpoint


def load_run_checkpoint(path: str | Path) -> RunCheckpoint:
    """The lipexp checkpoint at ``path`` (on the CPU); FileNotFoundError or CheckpointError
    naming the file when it is missing, unreadable or not a lipexp checkpoint."""
    checkpoint = read_checkpoint(path)
    if "lipexp_config" not in checkpoint or "state_dict" not in checkpoint:
        keys = ", ".join(sorted(map(str, checkpoint))[:6])
        raise CheckpointError(f"{path}: not a lipexp checkpoint (no lipexp_config; its keys: "
                              f"{keys or 'none'})")
    return RunCheckpoint(
        path=Path(path).resolve(),
        config=upgrade_run_config(checkpoint["lipexp_config"]),
        state_dict=checkpoint["state_dict"],
        epoch=checkpoint.get("epoch"),
        global_step=checkpoint.get("global_step"),
        provenance=checkpoint.get("lipexp_provenance"),
    )


def load_weights(module: nn.Module, checkpoint: RunCheckpoint) -> None:
    """``module.load_state_dict(checkpoint.state_dict)``, or CheckpointError saying in one
    line how the checkpoint's weights differ from the model its config builds."""
    try:
        module.load_state_dict(checkpoint.state_dict)
    except RuntimeError:
        expected, found = set(module.state_dict()), set(checkpoint.state_dict)
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        shapes = sorted(k for k in expected & found
                        if module.state_dict()[k].shape != checkpoint.state_dict[k].shape)
        parts = [f"{label} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''} "
                 f"({len(keys)})" for label, keys in
                 [("missing", missing), ("unexpected", unexpected), ("other shapes:", shapes)]
                 if keys]
        raise CheckpointError(f"{checkpoint.path}: its weights do not fit the model of its "
                              f"config: {'; '.join(parts)}") from None
