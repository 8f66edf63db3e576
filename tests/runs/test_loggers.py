"""A run's W&B logger is closed whatever happens, with the run's outcome as exit code."""

import pytest
import wandb
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from lipexp.runs.loggers import closing_logger


@pytest.fixture
def finished(monkeypatch):
    codes = []
    monkeypatch.setattr(wandb, "finish", lambda exit_code=None, **_: codes.append(exit_code))
    return codes


def wandb_logger(tmp_path):
    return WandbLogger(project="lipexp-test", save_dir=str(tmp_path), offline=True)


def test_a_completed_block_finishes_the_wandb_run_with_0(tmp_path, finished):
    with closing_logger(wandb_logger(tmp_path)):
        pass
    assert finished == [0]


def test_a_failing_block_finishes_the_wandb_run_with_1_and_reraises(tmp_path, finished):
    with pytest.raises(RuntimeError, match="boom"), closing_logger(wandb_logger(tmp_path)):
        raise RuntimeError("boom")
    assert finished == [1]


def test_other_loggers_are_left_alone(tmp_path, finished):
    with closing_logger(CSVLogger(str(tmp_path))), closing_logger(None):
        pass
    assert finished == []
