"""Shared fixtures: Hydra configs composed from conf/ (as run.py does), tiny models."""

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lipexp.config import register

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never reach the network
REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"  # real MNIST etc.; never copied into the repo
register()


def _reject(token: str):
    raise ValueError(f"{token} is not JSON")


@pytest.fixture(autouse=True)
def results_are_strict_json(tmp_path):
    """Every results.json a test leaves under its tmp_path parses as strict JSON: no NaN or
    Infinity tokens, which most JSON readers reject (lipexp.files.strict_json)."""
    yield
    for path in tmp_path.rglob("results.json"):
        json.loads(path.read_text(), parse_constant=_reject)


@pytest.fixture
def one_thread():
    """One torch thread during the test: tiny models run faster without thread overhead, and
    results do not depend on the machine's core count. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_run(cfg):
    """``(module, datamodule, trainer)`` of a run config as ``lipexp.train.run`` builds them,
    the end-of-training evaluation callback included."""
    from lipexp.build import build_datamodule, build_evaluator, build_module, build_trainer
    from lipexp.evaluation.callback import RobustnessEvaluation

    module, datamodule = build_module(cfg), build_datamodule(cfg)
    evaluation = RobustnessEvaluation(build_evaluator(cfg), cfg.paths.output_dir)
    return module, datamodule, build_trainer(cfg, module, [evaluation])


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
