"""Where a number came from: the code (lipexp commit, versions), the command and the time."""

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lipexp.version import __version__


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict[str, Any]:
    """Versions and the lipexp commit (``-dirty`` with uncommitted changes), so that every
    number can be traced to its code; stored in results.json and in every checkpoint."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None  # installed without its git history
    return {
        "lipexp": __version__,
        "lipexp_commit": commit,
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "pytorch_lightning": pl.__version__,
        "command": sys.argv,
    }


def machine(device: str) -> str:
    """The machine a timing was taken on: the GPU's name on ``cuda``, else the CPU's model,
    its cores and the torch threads (benchmarks/ record it with their numbers)."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
