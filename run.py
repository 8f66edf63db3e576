"""Entry point: ``python run.py [group=option ...] [key=value ...]``; ``-m`` sweeps.

Returns the clean test error (the metric a Hydra sweeper minimizes).
"""

import hydra
from omegaconf import DictConfig

from lipexp.config import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from lipexp.train import run  # imported here: torch loads after Hydra parsed the command

    return run(cfg)["clean"]["error"]


if __name__ == "__main__":
    main()
