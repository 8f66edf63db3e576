"""Errors as the ``lipexp`` commands and evaluate.py report them: one line, no traceback."""

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from lipexp.errors import Stopped

# What a command reports in one line: bad settings or input (ValueError, Hydra's and
# OmegaConf's errors, a missing file), a folder in use or a damaged checkpoint
# (RuntimeError: RunFolderError; CheckpointError is a ValueError), out of memory, a signal.
ERRORS = (HydraException, OmegaConfBaseException, ValueError, OSError, RuntimeError, Stopped)


def one_line(error: BaseException) -> str:
    """``error`` with its cause where the message does not already hold it, on one line."""
    cause = error.__cause__
    extra = f": {cause}" if cause and str(cause) not in str(error) else ""
    return " ".join(f"{error}{extra}".split())
