"""The ``lipexp`` command: ``lipexp report DIR`` summarizes a folder of runs (lipexp.report).

Also ``python -m lipexp.cli report DIR``.
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


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the subcommand; returns the exit
    status (argparse exits with 2 on a usage error)."""
    parser = argparse.ArgumentParser(prog="lipexp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="tables (report.md), CSVs and error-curve figures of a folder of runs")
    report.add_argument("folder", metavar="DIR",
                        help="a run folder or a Hydra multirun folder; the files go into it")
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args.folder)
    return 2  # unreachable: argparse rejects unknown subcommands


if __name__ == "__main__":
    sys.exit(main())
