"""``mode=eval``: the robustness evaluation of a checkpoint, again, with its own config."""

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from lipexp.build import build_datamodule, build_evaluator, build_module
from lipexp.checkpoint import load_run_checkpoint, load_weights
from lipexp.config import as_plain_dict, validate
from lipexp.provenance import provenance
from lipexp.runfolder import RunFolder, RunFolderError, read_results
from lipexp.stopping import GracefulStop


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` with the checkpoint's own config; only ``eval``, ``attacks``
    and the output folder come from this command (and the data folder, when the one the run
    was trained with does not exist here). The numbers equal the run's own evaluation.

    The output folder is the evaluation's own (by default ``<run>/eval/<attacks>-<time>``,
    conf/hydra/default.yaml): one that holds a training run or a completed evaluation is
    refused, so that nothing of the evaluated run is overwritten."""
    validate(cfg)
    if not cfg.ckpt_path:
        raise FileNotFoundError("mode=eval needs ckpt_path=PATH of a checkpoint")
    checkpoint = load_run_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(checkpoint.config)
    run_cfg.eval, run_cfg.attacks = cfg.eval, cfg.attacks
    run_cfg.paths.output_dir = cfg.paths.output_dir
    if run_cfg.data.get("on_device"):  # the training split stays where it is: not needed
        run_cfg.data.on_device = False
    if not Path(run_cfg.data.data_dir).exists():  # trained elsewhere: this command's folder
        run_cfg.data.data_dir = cfg.data.data_dir
    folder = RunFolder(cfg.paths.output_dir)
    entries = {"mode": "eval", "checkpoint": str(checkpoint.path), "epoch": checkpoint.epoch,
               "global_step": checkpoint.global_step, "config": as_plain_dict(run_cfg),
               "output_dir": str(folder.path.resolve()), "provenance": provenance(),
               "training_provenance": checkpoint.provenance}
    with folder.owned():
        _refuse_to_overwrite(folder)
        with folder.log_file(), GracefulStop(folder.path).handling(), \
                folder.record(entries) as results:
            _evaluate(cfg, folder, run_cfg, checkpoint, results)
    print(f"Run folder: {folder.path.resolve()}")
    return results


def _refuse_to_overwrite(folder: RunFolder) -> None:
    previous = read_results(folder.results)
    if folder.checkpoints() or (previous is not None and previous.get("mode") != "eval"):
        raise RunFolderError(f"{folder.path} holds a training run: mode=eval writes its own "
                             "folder (the default, <run>/eval/<attacks>-<time>, or "
                             "hydra.run.dir=ANOTHER_FOLDER)")
    if previous is not None and previous.get("status") == "completed":
        raise RunFolderError(f"{folder.path} holds a completed evaluation; choose another "
                             "folder (hydra.run.dir=...) or delete it")


def _evaluate(cfg: DictConfig, folder: RunFolder, run_cfg: DictConfig, checkpoint: Any,
              results: dict[str, Any]) -> None:
    """The evaluation itself, its numbers added to ``results``."""
    folder.save_hydra_record(cfg)
    pl.seed_everything(run_cfg.seed, workers=True)
    module = build_module(run_cfg)
    load_weights(module, checkpoint)
    module.to("cuda" if torch.cuda.is_available() else "cpu")
    data = build_datamodule(run_cfg)
    data.setup("test")
    results |= build_evaluator(run_cfg)(module.net, data, str(folder.path)) or {}
