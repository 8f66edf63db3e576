"""The ``lipexp`` command: ``lipexp report DIR`` summarizes a folder of runs (lipexp.report).

``lipexp lipschitz data [--split train|test] [overrides ...]``: the data set's Lipschitz
constant (lipexp.lipschitz.data_constant). ``lipexp eval RUN_DIR_OR_CHECKPOINT [overrides
...]``: a run's robustness evaluation, again (lipexp.runs.reevaluate). Also ``python -m
lipexp.cli report DIR``. One module per command; this one parses the command line.
"""

import argparse
import sys

from lipexp.cli.eval import eval_cli
from lipexp.cli.lipschitz import lipschitz_data_command
from lipexp.cli.report import report_command
from lipexp.cli.tune import add_tune_parser, tune_command


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the subcommand; returns the exit
    status (argparse exits with 2 on a usage error)."""
    parser = argparse.ArgumentParser(prog="lipexp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="tables (report.md), CSVs and error-curve figures of a folder of runs")
    report.add_argument("folder", metavar="DIR",
                        help="a run folder or a Hydra multirun folder; the files go into it")
    report.add_argument("--baseline", default="J0", metavar="DEFENCE",
                        help="the row each defence's median is compared with, paired on the "
                        "same images (default: J0)")
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
    evaluate = commands.add_parser(
        "eval", help="a run's robustness evaluation, again: its checkpoint, with its own config",
        description="Evaluate a run's checkpoint again, as `python evaluate.py "
        "ckpt_path=PATH` does: with the checkpoint's own config, its evaluation settings "
        "included; overrides change them (eval.KEY=..., attacks=[...] chooses the attacks, "
        "attacks.NAME.KEY=... changes one, logger=none). The results go to "
        "RUN/eval/<attacks>-<time>/ (or hydra.run.dir=...).")
    evaluate.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT",
                          help="a run folder (its newest readable checkpoint, "
                          "checkpoints/last.ckpt at the end of training) or a checkpoint file")
    evaluate.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                          help="eval.KEY=VALUE, attacks=[l2_pgd,...], attacks.NAME.KEY=VALUE, "
                          "logger=none, hydra.run.dir=FOLDER, data.data_dir=FOLDER (paths "
                          "taken literally)")
    add_tune_parser(commands)  # lipexp tune SWEEP_FILE [overrides] (lipexp.cli.tune)
    # Overrides may come after options (data=mnist --split test data.download=false): the
    # ones argparse leaves over are overrides too; anything else is rejected as before.
    args, extra = parser.parse_known_args(argv)
    if args.command == "lipschitz" and not any(e.startswith("-") for e in extra):
        return lipschitz_data_command(args, [*args.overrides, *extra])
    if args.command == "tune":  # its overrides may come after options too
        return tune_command(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "report":
        return report_command(args.folder, args.baseline)
    if args.command == "eval":
        return eval_cli(args.target, args.overrides)
    return 2  # unreachable: argparse rejects unknown subcommands


if __name__ == "__main__":
    sys.exit(main())
