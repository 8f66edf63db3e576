"""A run's robustness evaluation, again: its checkpoint, with its own config (``lipexp eval``,
lipexp.cli; ``python evaluate.py ckpt_path=...``, conf/evaluate.yaml).

One plan (``plan_evaluation``), computed once from this command's config and the checkpoint:
the run's config with this command's evaluation settings, the evaluator built from them
(every attack's own checks), and the evaluation's folder. Then one run of it
(``run_plan``) in the folder's lifecycle (lipexp.runs.session). Nothing is written, no folder
made, before the plan stands.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

from lipexp.config.overrides import override_key, reevaluate_command
from lipexp.config.resolvers import eval_dirname
from lipexp.config.schema import as_plain_dict, validate
from lipexp.errors import require
from lipexp.evaluation.runner import Evaluator
from lipexp.evaluation.summary import headline
from lipexp.runs.build import build_datamodule, build_evaluator, build_module
from lipexp.runs.checkpoint import RunCheckpoint, load_run_checkpoint, load_weights
from lipexp.runs.folder import RunFolder, RunFolderError, read_results
from lipexp.runs.loggers import closing_logger
from lipexp.runs.provenance import provenance
from lipexp.runs.session import session
from lipexp.runs.stopping import GracefulStop
from lipexp.runs.threads import fit_threads

log = logging.getLogger(__name__)
# the settings a re-evaluation takes from its own command; the checkpoint's config decides
# the rest (logger=none: no logger for the evaluation)
EVALUATION = ("eval", "attacks", "logger")


@dataclass(frozen=True)
class EvaluationPlan:
    """One re-evaluation, checked: ``checkpoint`` (read), ``run_cfg`` (the run's config with
    this command's evaluation, output folder and, where the run's is not here, data folder),
    ``evaluator`` (built from it), ``folder`` (the evaluation's own), ``record`` (this
    command's config as .hydra/config.yaml keeps it) and ``overrides`` (this command's
    evaluation overrides, which the printed re-evaluate command repeats)."""

    checkpoint: RunCheckpoint
    run_cfg: DictConfig
    evaluator: Evaluator
    folder: Path
    record: DictConfig
    overrides: tuple[str, ...]


def plan_evaluation(cfg: DictConfig, overrides: list[str],
                    checkpoint: RunCheckpoint | None = None,
                    folder: str | Path | None = None) -> EvaluationPlan:
    """The plan of evaluating ``cfg.ckpt_path`` (a checkpoint file, or a run folder: its final
    weights, ``RunFolder.final_checkpoint``; or ``checkpoint``, already read) with the
    checkpoint's own config, its evaluation included; this command's ``eval.*``,
    ``attacks`` and ``logger`` overrides change it (``evaluation_config``); without them the
    numbers equal the run's own evaluation. ``folder``: the evaluation's (default
    ``cfg.paths.output_dir`` when set, else ``<run>/eval/<attacks>-<time>`` beside the
    checkpoint's run). This command's settings are checked before the checkpoint is read
    (the schema's ranges), the evaluation's once it is known (the schema's, then each
    attack's constructor): ValueError, FileNotFoundError, CheckpointError."""
    validate(cfg)  # this command's settings, before the checkpoint is read
    if checkpoint is None:  # a checkpoint file, or a run folder's final weights
        require(bool(cfg.get("ckpt_path")), "give ckpt_path=PATH of a checkpoint")
        path = Path(cfg.ckpt_path)
        checkpoint = (RunFolder(path).final_checkpoint(load_run_checkpoint) if path.is_dir()
                      else load_run_checkpoint(path))
    run_cfg = OmegaConf.create(checkpoint.config)
    run_cfg.eval, run_cfg.attacks = evaluation_config(cfg, run_cfg, overrides)
    if any(override_key(o).split(".")[0] == "logger" for o in overrides):
        run_cfg.logger = cfg.logger  # this command's choice (logger=none: no logger)
    evaluator = build_evaluator(run_cfg)  # the evaluation that will run, its checks passed
    if folder is None:
        folder = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
    if not folder:
        folder = eval_dirname(str(checkpoint.path), list(run_cfg.attacks),
                              time.strftime("%Y%m%d-%H%M%S"))
    run_cfg.paths.output_dir = str(folder)
    if run_cfg.data.get("on_device"):  # the training split stays where it is: not needed
        run_cfg.data.on_device = False
    if not Path(run_cfg.data.data_dir).exists():  # trained elsewhere: this command's folder
        run_cfg.data.data_dir = cfg.data.data_dir
    record = OmegaConf.to_container(cfg)  # the command's, with the evaluation that runs
    record |= {"ckpt_path": str(checkpoint.path),
               "eval": OmegaConf.to_container(run_cfg.eval, resolve=True),
               "attacks": OmegaConf.to_container(run_cfg.attacks, resolve=True)}
    given = tuple(o for o in overrides if override_key(o).split(".")[0] in EVALUATION)
    return EvaluationPlan(checkpoint, run_cfg, evaluator, Path(folder), OmegaConf.create(record),
                          given)


def run_plan(plan: EvaluationPlan) -> dict[str, Any]:
    """Run ``plan`` in its folder's lifecycle: a folder that holds a training run or a
    completed evaluation is refused (nothing of the evaluated run is overwritten); the
    run's logger (``logger`` of its config) logs the numbers into the folder. Returns the
    results that results.json holds."""
    folder, checkpoint = RunFolder(plan.folder), plan.checkpoint
    entries = {"mode": "eval", "checkpoint": str(checkpoint.path), "epoch": checkpoint.epoch,
               "global_step": checkpoint.global_step, "config": as_plain_dict(plan.run_cfg),
               "output_dir": str(folder.path.resolve()), "provenance": provenance(),
               "training_provenance": checkpoint.provenance}
    with session(folder, entries, check=_refuse_to_overwrite, record=plan.record,
                 stop=GracefulStop(folder.path), overrides=list(plan.overrides),
                 completed=lambda results: log.info("re-evaluate: %s", results["reevaluate"])
                 ) as work:
        _evaluate(plan, work.results)
        # this evaluation, repeated
        work.results["reevaluate"] = reevaluate_command(checkpoint.path, plan.overrides)
    print(f"Run folder: {folder.path.resolve()}")
    if "evaluation" in work.results:
        print(f"Evaluation: {headline(work.results)}")
    print(f"Re-evaluate: {work.results['reevaluate']}")
    return work.results


def evaluate_checkpoint(cfg: DictConfig, checkpoint: RunCheckpoint | None = None,
                        overrides: list[str] | None = None) -> dict[str, Any]:
    """``run_plan(plan_evaluation(...))``: the evaluation task (evaluate.py's job).
    ``overrides``: this command's (None: the Hydra job's, none outside one)."""
    return run_plan(plan_evaluation(cfg, _overrides() if overrides is None else overrides,
                                    checkpoint))


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
    """RunFolderError where ``folder`` holds a training run or a completed evaluation."""
    previous = read_results(folder.results)
    if folder.checkpoints() or (previous is not None and previous.get("mode") != "eval"):
        raise RunFolderError(f"{folder.path} holds a training run: an evaluation writes its "
                             "own folder (the default, <run>/eval/<attacks>-<time>, or "
                             "paths.output_dir=ANOTHER_FOLDER)")
    if previous is not None and previous.get("status") == "completed":
        raise RunFolderError(f"{folder.path} holds a completed evaluation; choose another "
                             "folder (paths.output_dir=...) or delete it")


def _evaluate(plan: EvaluationPlan, results: dict[str, Any]) -> None:
    """The evaluation itself, its numbers added to ``results`` and logged."""
    run_cfg, folder = plan.run_cfg, plan.folder
    fit_threads()  # one process: the CPUs it may use (a container's quota too)
    pl.seed_everything(run_cfg.seed, workers=True)
    module = build_module(run_cfg, training=False)
    load_weights(module, plan.checkpoint)
    module.to("cuda" if torch.cuda.is_available() else "cpu")
    data = build_datamodule(run_cfg)
    data.setup("test")
    with closing_logger(evaluation_logger(run_cfg, folder)) as logger:
        if logger:
            logger.log_hyperparams(results["config"])
        status = "failed"
        try:
            results |= plan.evaluator(module.net, data, str(folder), logger) or {}
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
