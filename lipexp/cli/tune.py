"""``lipexp tune SWEEP_FILE [overrides ...]``: robustness-aware tuning, an Optuna study whose
trials are lipexp runs (lipexp.tune, docs/tuning.md); at the end the sweep folder's
report with the Pareto front (lipexp.report, lipexp.report.pareto)."""

import argparse
import sys
from pathlib import Path

DESCRIPTION = (
    "Tune the keys a sweep file names (sweeps/tune_digits.yaml: lip.lam, adv.eps) for "
    "robustness: an Optuna study in <sweep folder>/study.db whose trials are ordinary runs "
    "(python run.py -m ..., each in its own folder with results.json), minimizing the clean "
    "test error and maximizing the best-known median l2 distance, or one objective with a "
    "cap on the clean error. The same command again runs only the missing trials. Ends with "
    "`lipexp report` of the sweep folder: report.md, pareto.png, pareto.md, pareto.csv.")


def add_tune_parser(commands) -> None:
    """The ``tune`` subcommand on ``commands`` (the ``lipexp`` parser's subparsers)."""
    tune = commands.add_parser("tune", help="robustness-aware tuning: an Optuna study of "
                               "lipexp runs, with its Pareto front", description=DESCRIPTION)
    tune.add_argument("sweep_file", metavar="SWEEP_FILE",
                      help="a tuning sweep file (sweeps/tune_digits.yaml)")
    tune.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                      help="KEY=VALUE for every trial (recipe.epochs=10, logger=wandb, "
                      "hydra/launcher=slurm); KEY=interval(0,1), KEY=a,b, ...: a parameter "
                      "to tune; name=NAME: the study; hydra.sweep.dir=DIR: the sweep folder "
                      "(default multirun/<name>)")
    tune.add_argument("--n-trials", type=int, default=None, metavar="N",
                      help="finished trials the study should hold (default: the file's)")
    tune.add_argument("--jobs", type=int, default=None, metavar="N",
                      help="trials run at once (default: the file's, else 1)")


def tune_command(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the study, then write the report; exit status 1 with one line on stderr when the
    sweep file or an override is refused, 130 after Ctrl-C (the same command continues)."""
    from lipexp.cli.errors import ERRORS, one_line

    if options := [e for e in extra if e.startswith("-")]:
        print(f"lipexp tune: error: unrecognized arguments: {' '.join(options)}",
              file=sys.stderr)
        return 2
    from lipexp.tune.spec import TuneError, load_spec
    from lipexp.tune.trials import tune

    try:
        spec = load_spec(args.sweep_file, [*args.overrides, *extra], n_trials=args.n_trials,
                         jobs=args.jobs)
        summary = tune(spec, echo=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("lipexp tune: interrupted; the trials under way are asked again by the same "
              "command", file=sys.stderr)
        return 130
    except (TuneError, *ERRORS) as e:
        print(f"lipexp tune: error: {one_line(e)}", file=sys.stderr)
        return 1
    return _report(Path(summary["folder"]))


def _report(folder: Path) -> int:
    from lipexp.report import report
    from lipexp.report.pareto import FIGURE, LISTING, TABLE

    if not any(folder.rglob("results.json")):
        print(f"no run in {folder} yet: no report")
        return 0
    summary = report(folder)
    listing = folder / LISTING
    if listing.is_file():
        print(listing.read_text(encoding="utf-8").rstrip())
    for path in [summary["files"]["markdown"], folder / FIGURE, folder / TABLE, listing]:
        print(path)
    return 0
