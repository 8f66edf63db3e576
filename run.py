"""Entry point: ``python run.py [group=option ...] [key=value ...]``; ``-m`` sweeps.

Returns the clean test error (the metric a Hydra sweeper minimizes).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lipexp.config.compat import old_name_errors
from lipexp.config.overrides import unknown_choices
from lipexp.config.schema import register
from lipexp.runs.ddp_launch import child_argv

register()
if (argv := child_argv()) is not None:
    # A DDP child started by Lightning: run the parent's job (lipexp.runs.ddp_launch.job_scope).
    sys.argv = [sys.argv[0], *argv]
if __name__ == "__main__" and (old_names := old_name_errors(sys.argv[1:])):
    sys.exit("\n".join(old_names))  # adv=l2, lip.norm=1, +defence=...: one line each
if __name__ == "__main__" and any(a.partition("=")[::2] == ("mode", "eval")
                                  for a in sys.argv[1:]):
    sys.exit("mode=eval moved in lipexp 0.6: use python evaluate.py ckpt_path=PATH [overrides] "
             "or lipexp eval RUN_DIR_OR_CHECKPOINT [overrides]")
if __name__ == "__main__" and (unknown := unknown_choices(
        [a for a in sys.argv[1:] if not a.startswith("-")], Path(__file__).parent / "conf")):
    sys.exit("\n".join(unknown))  # before Hydra, whose message for lists names no option


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    # imported here: the heavy modules load only after Hydra has parsed the command line
    from lipexp.runs.train import run

    return run(cfg)["clean"]["error"]  # the whole test split's clean error


if __name__ == "__main__":
    main()
