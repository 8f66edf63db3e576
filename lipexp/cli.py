"""The ``lipexp`` command: ``lipexp report DIR`` summarizes a folder of runs (lipexp.report).

``lipexp lipschitz data [--split train|test] [overrides ...]``: the data set's Lipschitz
constant (lipexp.lipschitz.data_constant). ``lipexp eval RUN_DIR_OR_CHECKPOINT [overrides
...]``: a run's robustness evaluation, again (lipexp.runs.reevaluate). Also ``python -m
lipexp.cli report DIR``. (The quoting of overrides for Hydra's command line:
lipexp.config.overrides.)
"""

import argparse
import sys
import time
from pathlib import Path

from lipexp.config.overrides import hydra_quoted, override_key, under

CONF = Path(__file__).resolve().parents[1] / "conf"  # the repository's, beside run.py
# The settings a re-evaluation takes from its own command line, with their sub-keys; the
# checkpoint's config decides the rest.
EVALUATION = ("eval", "attacks", "logger")  # logger=none: no logger for the evaluation
# Paths that ``lipexp eval`` may set too, taken literally (quoted for Hydra): the output
# folder, and where the data set is read (when the run's own data folder is not here).
EVAL_PATHS = ("hydra.run.dir", "data.data_dir", "paths.data_dir")


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


def is_eval(args: list[str]) -> bool:
    """Whether run.py's arguments ask for one re-evaluation: ``mode=eval`` (or quoted) and
    no option (``-m``, ``--cfg``, ``--help``: Hydra's own)."""
    modes = [a.partition("=")[2].strip("'\"") for a in args if override_key(a) == "mode"]
    return bool(modes) and modes[-1] == "eval" and not any(a.startswith("-") for a in args)


def run_py_eval(args: list[str]) -> int:
    """``python run.py mode=eval ckpt_path=PATH [overrides]`` as ``lipexp eval PATH
    [overrides]``: the same checks, all before Hydra makes a folder (Hydra's own job would
    make the output folder first). PATH as given, or as a Hydra quoted string."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    paths = [a for a in args if override_key(a) == "ckpt_path"]
    rest = [a for a in args if override_key(a) not in ("mode", "ckpt_path")]
    if len(paths) != 1 or not paths[0].partition("=")[2]:
        print("run.py mode=eval: error: give one ckpt_path=PATH of a checkpoint (or use "
              "lipexp eval RUN_DIR_OR_CHECKPOINT)", file=sys.stderr)
        return 1
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    target = paths[0].partition("=")[2]
    try:
        (parsed,) = OverridesParser.create().parse_overrides(paths)
        target = parsed.value() if isinstance(parsed.value(), str) else target  # unquoted
        if "${" in target:  # an interpolation (${oc.env:CKPT}), resolved as Hydra would
            target = str(OmegaConf.create({"path": target}).path)
    except OverrideParseException:
        pass  # a path that Hydra's grammar cannot read (adv=l2,...): taken as it is
    except OmegaConfBaseException as e:
        print(f"run.py mode=eval: error: {paths[0]}: {' '.join(str(e).split())}",
              file=sys.stderr)
        return 1
    return _eval(target, rest, prog="run.py mode=eval")


def _eval(target: str, overrides: list[str], prog: str = "lipexp eval") -> int:
    """Evaluate ``target`` again (``eval_command``); exit status 1, with one line on stderr
    (``prog: error: ...``), when it cannot be."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lipexp.errors import Stopped

    try:
        eval_command(Path(target), overrides)
    except (HydraException, OmegaConfBaseException, ValueError, OSError, RuntimeError,
            Stopped) as e:  # RuntimeError: RunFolderError, a folder in use; out of memory
        cause = f": {e.__cause__}" if e.__cause__ and str(e.__cause__) not in str(e) else ""
        print(f"{prog}: error: {' '.join(f'{e}{cause}'.split())}", file=sys.stderr)
        return 1
    return 0


def eval_command(target: Path, overrides: list[str]) -> dict:
    """``lipexp eval``: evaluate the run folder ``target``'s newest readable checkpoint, or the
    checkpoint file ``target``, as ``python run.py mode=eval ckpt_path=PATH [overrides]``
    does: the same config, Hydra job (output folder, logging, .hydra record) and function
    (lipexp.runs.reevaluate.evaluate_checkpoint); returns its results. ``overrides``: ``eval.*``,
    ``attacks``, ``EVAL_PATHS``; paths go to Hydra as quoted strings. Everything is checked
    before Hydra makes the output folder, the settings before the checkpoint is read:
    ValueError, Hydra's and OmegaConf's errors, FileNotFoundError, CheckpointError,
    RunFolderError."""
    overrides = _eval_overrides(target, overrides)
    given = [o for o in overrides if under(override_key(o), EVALUATION)]  # not the paths
    settings = []  # attacks.NAME.* without attacks=[...]: for the run's own attack NAME,
    if "attacks" not in map(override_key, given):  # which conf/'s list may not have
        settings = [o for o in overrides if override_key(o).startswith("attacks.")]
        overrides = [o for o in overrides if o not in settings]
    from hydra import compose, initialize_config_dir  # imported now: torch loads slowly
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lipexp.config.compat import old_name_errors
    from lipexp.config.resolvers import eval_dirname
    from lipexp.config.schema import register
    from lipexp.runs import reevaluate
    from lipexp.runs.checkpoint import load_run_checkpoint
    from lipexp.runs.folder import RunFolder

    if old_names := old_name_errors(overrides):  # attacks=[fgsm]: refused, as by run.py
        raise ValueError("; ".join(old_names))
    register()
    with initialize_config_dir(config_dir=str(CONF), job_name="run", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        reevaluate.check_settings(cfg)
        try:  # attacks.NAME.* checked now where conf/'s list has NAME, else with the run's
            early = compose("config", overrides=[*overrides, *settings]) if settings else None
        except (HydraException, OmegaConfBaseException):
            early = None
        if early is not None:
            reevaluate.check_settings(early)
        checkpoint = (_final_or_newest(RunFolder(target), load_run_checkpoint)
                      if target.is_dir() else load_run_checkpoint(target))
        # the evaluation that will run (the run's own, with the overrides), its settings
        # checked and its attacks naming the folder, before Hydra makes it
        run_cfg = OmegaConf.create(checkpoint.config)
        run_cfg.eval, attacks = reevaluate.evaluation_config(cfg, run_cfg, given)
        run_cfg.attacks = attacks
        reevaluate.check_settings(run_cfg)
        if not any(override_key(o) == "hydra.run.dir" for o in overrides):
            folder = eval_dirname(str(checkpoint.path), list(attacks),
                                  time.strftime("%Y%m%d-%H%M%S"))
            overrides = [*overrides, f"hydra.run.dir={hydra_quoted(folder)}"]

        def job(cfg):  # Hydra reports a failed job in several lines; _eval does in one
            try:
                return reevaluate.evaluate_checkpoint(cfg, checkpoint, given)
            except Exception as e:
                return e

        # run.py's job (its task name, run), without the error report of hydra.main
        outcome = GlobalHydra.instance().hydra.run(
            config_name="config", task_function=job,
            overrides=[*overrides, f"ckpt_path={hydra_quoted(str(checkpoint.path))}"])
    if isinstance(outcome.return_value, Exception):
        raise outcome.return_value
    return outcome.return_value


def _final_or_newest(folder, read):
    """A completed run's final weights, ``checkpoints/last.ckpt``; else the folder's newest
    readable checkpoint (file times can mislead in a copied folder: a completed run's
    last.ckpt is the one it evaluated)."""
    from lipexp.runs.folder import read_results

    results = read_results(folder.results) or {}
    last = folder.path / "checkpoints" / "last.ckpt"
    if results.get("status") == "completed" and last.is_file():
        return read(last)
    return folder.newest_checkpoint(read)


def _eval_overrides(target: Path, overrides: list[str]) -> list[str]:
    """Hydra's overrides for ``lipexp eval``: ``mode=eval``, then ``overrides``, paths quoted;
    ValueError for an override it does not take, a missing ``target`` or an attack that
    conf/attacks/ does not have."""
    from lipexp.config.schema import unknown_choices
    from lipexp.errors import require

    refused = [o for o in overrides if not under(override_key(o), (*EVALUATION, *EVAL_PATHS))]
    require(not refused, f"{refused[0] if refused else ''}: lipexp eval overrides only eval.*, "
            f"attacks (attacks=[...], attacks.NAME.*), logger and the paths "
            f"{', '.join(EVAL_PATHS)}; "
            "the checkpoint's own config decides the rest")
    loggers = [o for o in overrides if override_key(o).startswith("logger.")]
    require(not loggers, f"{loggers[0] if loggers else ''}: lipexp eval takes logger=OPTION "
            "(logger=none, csv, wandb, ...), not the logger's settings: the run's own are used")
    require(target.exists(), f"{target}: no such run folder or checkpoint file")
    paths = [str(target), *(o.partition("=")[2] for o in overrides
                            if override_key(o) in EVAL_PATHS)]
    require("${" not in "".join(paths), f"{paths}: a path with '${{' is not taken: Hydra and "
            "OmegaConf would read it as an interpolation")
    require(all(paths), "an empty path (hydra.run.dir=, data.data_dir=) is not taken: give a "
            "folder")
    unknown = unknown_choices(overrides, CONF)  # Hydra's own message names no option
    require(not unknown, "; ".join(unknown))
    return ["mode=eval", *(f"{override_key(o)}={hydra_quoted(o.partition('=')[2])}"
                           if override_key(o) in EVAL_PATHS else o for o in overrides)]


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
    evaluate = commands.add_parser(
        "eval", help="a run's robustness evaluation, again: its checkpoint, with its own config",
        description="Evaluate a run's checkpoint again, as `python run.py mode=eval "
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
    # Overrides may come after options (data=mnist --split test data.download=false): the
    # ones argparse leaves over are overrides too; anything else is rejected as before.
    args, extra = parser.parse_known_args(argv)
    if args.command == "lipschitz" and not any(e.startswith("-") for e in extra):
        return _lipschitz_data(args, [*args.overrides, *extra])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "report":
        return _report(args.folder)
    if args.command == "eval":
        return _eval(args.target, args.overrides)
    return 2  # unreachable: argparse rejects unknown subcommands


if __name__ == "__main__":
    sys.exit(main())
