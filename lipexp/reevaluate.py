"""``mode=eval``: the robustness evaluation of a checkpoint, again, with its own config (also
``lipexp eval``, lipexp.cli)."""

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

from lipexp.build import build_datamodule, build_evaluator, build_module
from lipexp.checkpoint import RunCheckpoint, load_run_checkpoint, load_weights
from lipexp.config import as_plain_dict, validate
from lipexp.errors import require
from lipexp.evaluation.runner import Evaluator
from lipexp.loggers import closing_logger
from lipexp.overrides import override_key, reevaluate_command
from lipexp.provenance import provenance
from lipexp.runfolder import RunFolder, RunFolderError, read_results
from lipexp.stopping import GracefulStop

log = logging.getLogger(__name__)


def check_settings(cfg: DictConfig) -> Evaluator:
    """The evaluation of ``cfg.eval`` and ``cfg.attacks``, their range checks passed (the
    schema's, then each attack's constructor): a bad setting is refused before any
    checkpoint is read."""
    OmegaConf.to_object(cfg.eval)
    return build_evaluator(cfg)


def evaluate_checkpoint(cfg: DictConfig, checkpoint: RunCheckpoint | None = None,
                        overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` with the checkpoint's own config, its evaluation included;
    this command's ``eval.*`` and ``attacks`` overrides change it (``evaluation_config``),
    and the output folder and, when the one the run was trained with does not exist here,
    the data folder come from this command. Without overrides the numbers equal the run's
    own evaluation. ``overrides``: this command's (None: the Hydra job's, none outside one);
    ``logger=...`` among them replaces the run's logger.
    ``checkpoint``: the one at ``cfg.ckpt_path``, already read (``lipexp eval`` reads it
    before Hydra makes the output folder).

    The output folder is the evaluation's own (by default ``<run>/eval/<attacks>-<time>``,
    conf/hydra/default.yaml): one that holds a training run or a completed evaluation is
    refused, so that nothing of the evaluated run is overwritten. The run's logger
    (``logger`` of its config) logs the numbers into this folder."""
    validate(cfg)
    check_settings(cfg)  # this command's settings, before the checkpoint is read
    if checkpoint is None:
        if not cfg.ckpt_path:
            raise FileNotFoundError("mode=eval needs ckpt_path=PATH of a checkpoint")
        checkpoint = load_run_checkpoint(cfg.ckpt_path)
    overrides = _overrides() if overrides is None else overrides
    run_cfg = OmegaConf.create(checkpoint.config)
    run_cfg.eval, run_cfg.attacks = evaluation_config(cfg, run_cfg, overrides)
    if any(override_key(o).split(".")[0] == "logger" for o in overrides):
        run_cfg.logger = cfg.logger  # this command's choice (logger=none: no logger)
    evaluator = build_evaluator(run_cfg)  # the run's settings passed their checks then
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
            _evaluate(cfg, folder, run_cfg, checkpoint, evaluator, results)
            results["reevaluate"] = reevaluate_command(  # this evaluation, repeated
                checkpoint.path, [o for o in overrides if override_key(o).split(".")[0]
                                  in ("eval", "attacks", "logger")])
            log.info("re-evaluate: %s", results["reevaluate"])
    print(f"Run folder: {folder.path.resolve()}")
    print(f"Re-evaluate: {results['reevaluate']}")
    return results


def _overrides() -> list[str]:
    """This Hydra job's command-line overrides (none outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def evaluation_config(cfg: DictConfig, run_cfg: DictConfig, overrides: list[str]
                      ) -> tuple[DictConfig, DictConfig]:
    """The evaluation's ``(eval, attacks)``: the run's own (``run_cfg``, its checkpoint's
    config, upgraded: a lipexp 0.3 run keeps its PGD search), with this command's
    ``overrides`` on top, their values taken from ``cfg`` (this command's config):
    ``eval.KEY=...`` replaces that setting; ``attacks=[...]`` chooses the attacks (with
    conf/attacks/'s settings and this command's ``attacks.NAME.KEY``); without it,
    ``attacks.NAME.KEY=...`` changes one setting of the run's attack NAME,
    ``attacks.NAME=...`` replaces it and ``~attacks.NAME`` drops it. ValueError for an
    ``attacks.NAME...`` override of an attack the run did not have."""
    keys = [override_key(o) for o in overrides]
    evaluation = OmegaConf.merge(run_cfg.get("eval") or cfg.eval, {
        k.split(".", 1)[1]: OmegaConf.select(cfg, k) for k in keys if k.startswith("eval.")})
    if "attacks" in keys or run_cfg.get("attacks") is None:
        return evaluation, cfg.attacks
    attacks = OmegaConf.create(OmegaConf.to_container(run_cfg.attacks))
    for override, key in zip(overrides, keys):
        if not key.startswith("attacks."):
            continue
        name, _, setting = key.removeprefix("attacks.").partition(".")
        require(name in attacks, f"{override}: the run has no attack {name} (its attacks: "
                f"{', '.join(attacks) or 'none'}); choose the attacks with attacks=[...]")
        if override.startswith("~"):
            node, field = (attacks, name) if not setting else (attacks[name], setting)
            del node[field]
        else:  # the value as Hydra reads it (the command's config need not have NAME)
            (parsed,) = OverridesParser.create().parse_overrides([override])
            OmegaConf.update(attacks, key.removeprefix("attacks."), parsed.value(),
                             merge=False)
    return evaluation, attacks


def _refuse_to_overwrite(folder: RunFolder) -> None:
    previous = read_results(folder.results)
    if folder.checkpoints() or (previous is not None and previous.get("mode") != "eval"):
        raise RunFolderError(f"{folder.path} holds a training run: mode=eval writes its own "
                             "folder (the default, <run>/eval/<attacks>-<time>, or "
                             "hydra.run.dir=ANOTHER_FOLDER)")
    if previous is not None and previous.get("status") == "completed":
        raise RunFolderError(f"{folder.path} holds a completed evaluation; choose another "
                             "folder (hydra.run.dir=...) or delete it")


def _evaluate(cfg: DictConfig, folder: RunFolder, run_cfg: DictConfig,
              checkpoint: RunCheckpoint, evaluator: Evaluator, results: dict[str, Any]) -> None:
    """The evaluation itself, its numbers added to ``results`` and logged."""
    record = OmegaConf.to_container(cfg)  # the command's, with the evaluation that ran
    record |= {"eval": results["config"]["eval"], "attacks": results["config"]["attacks"]}
    folder.save_hydra_record(OmegaConf.create(record))
    pl.seed_everything(run_cfg.seed, workers=True)
    module = build_module(run_cfg)
    load_weights(module, checkpoint)
    module.to("cuda" if torch.cuda.is_available() else "cpu")
    data = build_datamodule(run_cfg)
    data.setup("test")
    with closing_logger(evaluation_logger(run_cfg, folder.path)) as logger:
        if logger:
            logger.log_hyperparams(results["config"])
        status = "failed"
        try:
            results |= evaluator(module.net, data, str(folder.path), logger) or {}
            status = "success"
        finally:
            if logger:
                logger.finalize(status)  # a CSV logger writes its file only now


def evaluation_logger(run_cfg: DictConfig, output_dir: Path) -> Logger | None:
    """The run's own logger (``run_cfg.logger``; None without one), its files in
    ``output_dir``. On W&B a run of its own, in the training run's project and group, named
    ``eval of <the run's name>``, job type ``eval``."""
    if not run_cfg.get("logger"):
        return None
    settings = OmegaConf.to_container(run_cfg.logger, resolve=True)
    if "save_dir" in settings:
        settings["save_dir"] = str(output_dir)
    if issubclass(get_class(settings["_target_"]), WandbLogger):
        for key in ("id", "version", "resume"):  # a run of its own, never the training's
            settings.pop(key, None)
        name = settings.get("name")
        settings |= {"name": f"eval of {name}" if name else "eval", "job_type": "eval"}
    return instantiate(settings)
