"""The evaluation task: ``python evaluate.py ckpt_path=PATH [eval.*=...] [attacks=[...]]``.

A run's robustness evaluation, again, with the checkpoint's own config; this command's
``eval.*``, ``attacks`` (``attacks=[...]`` chooses, ``attacks.NAME.KEY=...`` changes one) and
``logger`` override it. Its root config is conf/evaluate.yaml (``ckpt_path: ???``). The
results go to ``<run>/eval/<attacks>-<time>/`` or ``paths.output_dir=FOLDER``; that folder is
made only once every check has passed (Hydra makes none: conf/evaluate.yaml). The same as
``lipexp eval RUN_DIR_OR_CHECKPOINT [overrides]``, which also takes paths Hydra's grammar
would misread (``=`` and ``,`` in folder names of lipexp < 0.6).

Returns the evaluated images' clean error (the metric a Hydra sweeper minimizes).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lipexp.config.compat import old_name_errors
from lipexp.config.overrides import unknown_choices
from lipexp.config.schema import register

register()
if __name__ == "__main__" and (refused := old_name_errors(sys.argv[1:]) or unknown_choices(
        [a for a in sys.argv[1:] if not a.startswith("-")], Path(__file__).parent / "conf")):
    sys.exit("\n".join(refused))  # before Hydra, whose message for lists names no option


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    # imported here: the heavy modules load only after Hydra has parsed the command line
    from lipexp.cli.errors import ERRORS, one_line
    from lipexp.runs.reevaluate import evaluate_checkpoint

    try:
        results = evaluate_checkpoint(cfg)
    except ERRORS as e:  # one line, not Hydra's report of a failed job
        sys.exit(f"evaluate.py: error: {one_line(e)}")
    return results["evaluation"]["clean_error"]


if __name__ == "__main__":
    main()
