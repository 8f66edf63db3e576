"""Entry point: ``python run.py [group=option ...] [key=value ...]``; ``-m`` sweeps.

Returns the clean test error (the metric a Hydra sweeper minimizes).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lipexp.cli import is_eval, run_py_eval
from lipexp.config.compat import old_name_errors
from lipexp.config.overrides import quote_ckpt_path
from lipexp.config.schema import Mode, register, unknown_choices
from lipexp.runs.ddp_launch import child_argv

register()
if (argv := child_argv()) is not None:
    # A DDP child started by Lightning: run the parent's job (lipexp.runs.ddp_launch.job_scope).
    sys.argv = [sys.argv[0], *argv]
if __name__ == "__main__" and (old_names := old_name_errors(sys.argv[1:])):
    sys.exit("\n".join(old_names))  # adv=l2, lip.norm=1, +defence=...: one line each
# ckpt_path=outputs/adv=l2,head=tanh/checkpoints/last.ckpt: a path as a Hydra quoted string
sys.argv[1:] = quote_ckpt_path(sys.argv[1:])
if __name__ == "__main__" and is_eval(sys.argv[1:]):
    # one re-evaluation: lipexp eval's checks, before Hydra makes any folder
    sys.exit(run_py_eval(sys.argv[1:]))
if __name__ == "__main__" and (unknown := unknown_choices(
        [a for a in sys.argv[1:] if not a.startswith("-")], Path(__file__).parent / "conf")):
    sys.exit("\n".join(unknown))  # before Hydra, whose message for lists names no option


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    # imported here: the heavy modules load only after Hydra has parsed the command line
    from lipexp.runs.reevaluate import evaluate_checkpoint
    from lipexp.runs.train import run

    results = {Mode.train: run, Mode.eval: evaluate_checkpoint}[Mode(cfg.mode)](cfg)
    if "clean" in results:  # training: the whole test split's clean error
        return results["clean"]["error"]
    return results["evaluation"]["clean_error"]  # mode=eval: the evaluated images'


if __name__ == "__main__":
    main()
