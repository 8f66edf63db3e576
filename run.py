"""Entry point: ``python run.py [group=option ...] [key=value ...]``; ``-m`` sweeps.

Returns the clean test error (the metric a Hydra sweeper minimizes).
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lipexp.config import Mode, register
from lipexp.ddp_launch import child_argv
from lipexp.deprecations import chosen_options, notices, rename_keys

register()
if (argv := child_argv()) is not None:
    # A DDP child started by Lightning: run the parent's job (lipexp.ddp_launch.job_scope).
    sys.argv = [sys.argv[0], *argv]
sys.argv[1:], KEY_NOTICES = rename_keys(sys.argv[1:])  # lip.norm=1 -> lip.dual_norm=1


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    said = notices(chosen_options(hydra_cfg.runtime.choices, hydra_cfg.overrides.task))
    for notice in [*KEY_NOTICES, *said]:
        logging.getLogger("lipexp").warning(notice)
    # imported here: the heavy modules load only after Hydra has parsed the command line
    from lipexp.reevaluate import evaluate_checkpoint
    from lipexp.train import run

    results = {Mode.train: run, Mode.eval: evaluate_checkpoint}[Mode(cfg.mode)](cfg)
    return results["clean"]["error"] if "clean" in results else results["clean_error"]


if __name__ == "__main__":
    main()
