"""``lipexp eval RUN_DIR_OR_CHECKPOINT [overrides ...]``: a run's robustness evaluation, again,
with the checkpoint's own config (lipexp.runs.reevaluate's plan, then its run).

This command's config is composed with Hydra's compose API from conf/evaluate.yaml (the
evaluation task's root config, as ``python evaluate.py`` uses it), its overrides limited to
the evaluation's settings and paths; paths are taken literally (any folder name, ``=`` and
``,`` included). Everything is checked before any folder is made.
"""

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lipexp.cli.errors import ERRORS, one_line
from lipexp.config.overrides import hydra_quoted, override_key, under
from lipexp.config.root import CONF, compose

# The settings a re-evaluation takes from its own command line, with their sub-keys; the
# checkpoint's config decides the rest (lipexp.runs.reevaluate.EVALUATION).
EVALUATION = ("eval", "attacks", "logger")  # logger=none: no logger for the evaluation
# Paths that ``lipexp eval`` may set too, taken literally: the output folder (either name),
# and where the data set is read (when the run's own data folder is not here).
OUTPUT = ("hydra.run.dir", "paths.output_dir")
EVAL_PATHS = (*OUTPUT, "data.data_dir", "paths.data_dir")


def eval_cli(target: str, overrides: list[str], prog: str = "lipexp eval") -> int:
    """Evaluate ``target`` again (``eval_command``); exit status 1, with one line on stderr
    (``prog: error: ...``), when it cannot be."""
    try:
        eval_command(Path(target), overrides)
    except ERRORS as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


def eval_command(target: Path, overrides: list[str]) -> dict:
    """Evaluate the run folder ``target``'s final weights (``RunFolder.final_checkpoint``), or
    the checkpoint file ``target``, with its own config and this command's ``overrides``
    (``eval.*``, ``attacks``, ``logger``, ``EVAL_PATHS``); returns the results. The settings
    are checked before the checkpoint is read where they can be (the command's own; an
    attack's setting for the run's own attack once the run's attacks are known): ValueError,
    Hydra's and OmegaConf's errors, FileNotFoundError, CheckpointError, RunFolderError."""
    _check_overrides(target, overrides)
    given = [o for o in overrides if under(override_key(o), EVALUATION)]
    paths = {override_key(o): o.partition("=")[2] for o in overrides
             if override_key(o) in EVAL_PATHS}
    folder = next((paths[k] for k in OUTPUT if k in paths), None)
    composed = [o for o in given if not _run_attack_setting(o, given)]
    composed += [f"{k}={hydra_quoted(v)}" for k, v in paths.items() if k not in OUTPUT]
    from lipexp.runs.reevaluate import plan_evaluation, run_plan  # now: torch loads slowly

    cfg = compose("evaluate", [*composed, "ckpt_path=''"], job_name="evaluate")
    cfg.ckpt_path = str(target)
    plan = plan_evaluation(cfg, given, folder=folder)
    with _console_log():
        return run_plan(plan)


def _run_attack_setting(override: str, given: list[str]) -> bool:
    """Whether ``override`` is ``attacks.NAME...`` without ``attacks=[...]``: a setting of the
    run's own attack NAME, which conf/'s default list need not have (applied to the run's
    config by lipexp.runs.reevaluate.evaluation_config, not composed)."""
    return (override_key(override).startswith("attacks.")
            and "attacks" not in map(override_key, given))


def _check_overrides(target: Path, overrides: list[str]) -> None:
    """ValueError for an override ``lipexp eval`` does not take, an old name, a missing
    ``target``, a path that is empty or holds ``${``, or an attack that conf/attacks/ does not
    have."""
    from lipexp.config.compat import old_name_errors
    from lipexp.config.overrides import unknown_choices
    from lipexp.errors import require

    refused = [o for o in overrides if not under(override_key(o), (*EVALUATION, *EVAL_PATHS))]
    require(not refused, f"{refused[0] if refused else ''}: lipexp eval overrides only eval.*, "
            f"attacks (attacks=[...], attacks.NAME.*), logger and the paths "
            f"{', '.join(EVAL_PATHS)}; the checkpoint's own config decides the rest")
    loggers = [o for o in overrides if override_key(o).startswith("logger.")]
    require(not loggers, f"{loggers[0] if loggers else ''}: lipexp eval takes logger=OPTION "
            "(logger=none, csv, wandb, ...), not the logger's settings: the run's own are used")
    old_names = old_name_errors(overrides)  # attacks=[fgsm]: refused, as by run.py
    require(not old_names, "; ".join(old_names))
    require(target.exists(), f"{target}: no such run folder or checkpoint file")
    paths = [str(target), *(o.partition("=")[2] for o in overrides
                            if override_key(o) in EVAL_PATHS)]
    require("${" not in "".join(paths), f"{paths}: a path with '${{' is not taken: Hydra and "
            "OmegaConf would read it as an interpolation")
    require(all(paths), "an empty path (hydra.run.dir=, data.data_dir=) is not taken: give a "
            "folder")
    unknown = unknown_choices(overrides, CONF)  # Hydra's own message names no option
    require(not unknown, "; ".join(unknown))


@contextmanager
def _console_log() -> Iterator[None]:
    """lipexp's log records on stdout for the command (in Hydra's format, as a Hydra job
    shows them), the handler removed after."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
