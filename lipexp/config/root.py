"""The repository's conf/ (beside run.py) and the one way lipexp composes a config from it
outside a Hydra job: the CLI (``lipexp eval``, ``lipexp lipschitz data``), the notebook API,
the benchmarks and the tests all call ``compose``, so each sees the config run.py would."""

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose(config_name: str = "config", overrides: Sequence[str] = (), *,
            job_name: str = "lipexp", return_hydra_config: bool = False) -> DictConfig:
    """The root config ``config_name`` of conf/ (``config``: run.py's, ``evaluate``:
    evaluate.py's) with ``overrides`` (Hydra's grammar), lipexp's schemas and resolvers
    registered first; ``return_hydra_config``: with Hydra's own node (``hydra.runtime
    .choices`` names the chosen options). Hydra's compose API (``initialize_config_dir``),
    not its private global state; outside a running Hydra app only."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lipexp.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(CONF), job_name=job_name, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)
