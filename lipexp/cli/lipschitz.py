"""``lipexp lipschitz data``: the data set's Lipschitz constant
(lipexp.lipschitz.data_constant)."""

import argparse
import sys


def lipschitz_data_command(args: argparse.Namespace, overrides: list[str]) -> int:
    """Compute and print the data set's constant; write its JSON. Exit status 1, with one
    line on stderr, when the config cannot be composed or the data cannot be loaded."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lipexp.data.sources import DataNotFoundError
    from lipexp.lipschitz.data_constant_cli import run, summary_line

    try:
        record, _ = run(overrides, split=args.split, block=args.block, out=args.out,
                           device=args.device)
    except (DataNotFoundError, HydraException, OmegaConfBaseException, ValueError, OSError,
            RuntimeError) as e:  # RuntimeError: a bad --device, or out of memory
        message = " ".join(str(e).split())  # one line
        print(f"lipexp lipschitz data: error: {type(e).__name__}: {message}", file=sys.stderr)
        return 1
    print(summary_line(record))
    return 0
