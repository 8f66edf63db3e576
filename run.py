"""Entry point: ``python run.py [group=option ...] [key=value ...]``; ``-m`` sweeps.

Returns the clean test error (the metric a Hydra sweeper minimizes).
"""

import json
import os
import sys

import hydra
from omegaconf import DictConfig

from lipexp.config import Mode, register

register()
if os.environ.get("LIPEXP_DDP_ARGV") and os.environ.get("LOCAL_RANK", "0") != "0":
    # A DDP child started by Lightning: run the parent's job (see train.py), not its argv.
    sys.argv = [sys.argv[0], *json.loads(os.environ["LIPEXP_DDP_ARGV"])]


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    # imported here: torch loads only after Hydra has parsed the command line
    from lipexp.train import evaluate_checkpoint, run

    results = {Mode.train: run, Mode.eval: evaluate_checkpoint}[Mode(cfg.mode)](cfg)
    return results["clean"]["error"] if "clean" in results else results["clean_error"]


if __name__ == "__main__":
    main()
