"""Shared fixtures: Hydra configs composed from conf/ (as run.py does), tiny models."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lipexp.config import register

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never reach the network
REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"  # real MNIST etc.; never copied into the repo
register()


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)``: the run config for these overrides, writing under tmp_path."""

    def _make(*overrides: str, output_dir: Path | None = None):
        out = output_dir or tmp_path / "run"
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(
                "config",
                overrides=[
                    f"paths.output_dir={out}",
                    "trainer.enable_progress_bar=false",
                    "+trainer.enable_model_summary=false",
                    *overrides,
                ],
            )

    return _make
