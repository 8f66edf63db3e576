"""The ``lipexp`` command: ``lipexp report DIR`` summarizes a folder of runs (lipexp.report).

``lipexp lipschitz data [--split train|test] [overrides ...]``: the data set's Lipschitz
constant (lipexp.lipschitz.data_constant). Also ``python -m lipexp.cli report DIR``.
"""

import argparse
import sys
from pathlib import Path


def _report(folder: str) -> int:
    """Write the report of ``folder``; print where the files are. Exit status 1 when
    ``folder`` does not exist or holds no results.json."""
    from lipexp.report import report  # imported here: torch and matplotlib load slowly

    if not Path(folder).is_dir():
        print(f"lipexp report: error: {folder} does not exist or is not a folder",
              file=sys.stderr)
        return 1
    try:
        summary = report(folder)
    except FileNotFoundError as e:
        print(f"lipexp report: error: {e}", file=sys.stderr)
        return 1
    files = summary["files"]
    print(f"{len(summary['rows'])} table rows (grid x defence), "
          f"{len(summary['failed'])} failed and {len(summary['unfinished'])} unfinished runs")
    for path in [files["markdown"], files["adversarial_csv"], files["stability_csv"],
                 files["attacks_csv"], *files["figures"]]:
        print(path)
    return 0


def _lipschitz_data(args: argparse.Namespace, overrides: list[str]) -> int:
    """Compute and print the data set's constant; write its JSON. Exit status 1, with one
    line on stderr, when the config cannot be composed or the data cannot be loaded."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lipexp.data.sources import DataNotFoundError
    from lipexp.lipschitz.data_constant import run, summary_line

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


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the subcommand; returns the exit
    status (argparse exits with 2 on a usage error)."""
    parser = argparse.ArgumentParser(prog="lipexp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="tables (report.md), CSVs and error-curve figures of a folder of runs")
    report.add_argument("folder", metavar="DIR",
                        help="a run folder or a Hydra multirun folder; the files go into it")
    lipschitz = commands.add_parser(
        "lipschitz", help="Lipschitz constants (lipexp.lipschitz)")
    what = lipschitz.add_subparsers(dest="what", required=True)
    data = what.add_parser(
        "data", help="the data set's constant: 1 / smallest l2 distance between differently "
        "labelled images (pixels in [0, 1]); prints one line and writes a JSON file",
        description="The data set's Lipschitz constant (l2 -> l-infinity, one-hot labels): "
        "1 / the smallest l2 distance between two differently labelled images, pixels in "
        "[0, 1], identical images with different labels excluded (counted). Exact: float32 "
        "candidates, recomputed in int64 / float64.")
    data.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                      help="Hydra overrides as for run.py: data=mnist data.data_dir=DIR "
                      "data.download=false (default data: digits)")
    data.add_argument("--split", choices=["train", "test"], default="train",
                      help="train: pairs of training images; test: each test image against "
                      "the training images (default: train)")
    data.add_argument("--block", type=int, default=None, metavar="N",
                      help="rows per block (memory ~ 2 x N x images x 4 bytes; default: "
                      "what fits 512 MiB)")
    data.add_argument("--out", default=None, metavar="FILE",
                      help="the JSON file (default: lipschitz_data_<data>_<split>.json here)")
    data.add_argument("--device", default=None,
                      help="torch device (default: cuda when available, else cpu)")
    # Overrides may come after options (data=mnist --split test data.download=false): the
    # ones argparse leaves over are overrides too; anything else is rejected as before.
    args, extra = parser.parse_known_args(argv)
    if args.command == "lipschitz" and not any(e.startswith("-") for e in extra):
        return _lipschitz_data(args, [*args.overrides, *extra])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "report":
        return _report(args.folder)
    return 2  # unreachable: argparse rejects unknown subcommands


if __name__ == "__main__":
    sys.exit(main())
