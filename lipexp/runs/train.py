"""One training run: train, test, evaluate, in the run's folder (``python run.py ...``)."""

import logging
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from lipexp.config.overrides import reevaluate_command
from lipexp.config.schema import as_plain_dict, validate
from lipexp.evaluation.callback import RobustnessEvaluation
from lipexp.evaluation.intervals import clean_error_interval
from lipexp.evaluation.summary import headline
from lipexp.resume import RunState
from lipexp.runs.build import build_datamodule, build_evaluator, build_module, build_trainer
from lipexp.runs.ddp_launch import job_scope
from lipexp.runs.folder import RunFolder
from lipexp.runs.loggers import closing_logger
from lipexp.runs.provenance import provenance
from lipexp.runs.session import session
from lipexp.runs.stopping import GracefulStop, requeued
from lipexp.runs.threads import fit_threads, node_processes

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and evaluate one configuration in ``cfg.paths.output_dir``; returns the
    results that results.json holds (lipexp.runs.session: the folder's lifecycle; a completed
    run is answered from its folder, lipexp.runs.folder's rules)."""
    folder, rank_zero = RunFolder(cfg.paths.output_dir), rank_zero_only.rank == 0
    resume = cfg.resume or (requeued() and bool(folder.checkpoints()))
    config = as_plain_dict(cfg)
    entries = {"config": config, "output_dir": str(folder.path.resolve()),
               "provenance": provenance()}
    stop = GracefulStop(folder.path / "checkpoints" / "step.ckpt")
    with session(folder, entries, check=lambda f: f.completed_results(resume, config),
                 record=cfg, stop=stop, write=rank_zero,
                 completed=lambda results: _say_where(folder, results) if rank_zero else None
                 ) as work:
        if not work.done:
            with job_scope(folder.path):
                _train(cfg, folder, resume, stop, work.results)
    return work.results


def _train(cfg: DictConfig, folder: RunFolder, resume: bool, stop: GracefulStop,
           results: dict[str, Any]) -> None:
    """Fit, test and evaluate, the numbers added to ``results``."""
    evaluated: list[dict | None] = []  # the end-of-training evaluation (results on rank 0)
    validate(cfg)  # the schemas' range checks, before any work
    pl.seed_everything(cfg.seed, workers=True)
    evaluator = build_evaluator(cfg)  # first: a bad attack setting stops the run at once
    module, data = build_module(cfg), build_datamodule(cfg)
    callback = RobustnessEvaluation(evaluator, str(folder.path), on_done=evaluated.append)
    trainer = build_trainer(cfg, module, [stop, RunState(), callback])
    fit_threads(node_processes(trainer))  # this node's processes share its CPUs (and quota)
    with closing_logger(trainer.logger) as logger:
        if logger:
            logger.log_hyperparams(module.config)
        trainer.fit(module, datamodule=data, ckpt_path=folder.resume_checkpoint(resume),
                    weights_only=True)  # a checkpoint is data, never code
        if not evaluated and not trainer.fast_dev_run:
            # A resumed run whose training had finished: Lightning skips the fit loop and
            # its on_train_end, so evaluate here (after fit, the module is on the CPU).
            module.to(trainer.strategy.root_device)
            evaluated.append(evaluator(module.net, data, str(folder.path), logger))
        (test,) = trainer.test(module, datamodule=data, verbose=False)
    results["trained"] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
    error, n = 1.0 - test["test/acc"], data.num_test
    results["clean"] = {"error": error, "loss": test["test/loss"], "n_images": n,  # the split
                        "error_interval": clean_error_interval(error, n)}
    results["data"] = {"n_train": data.num_train, "n_test": data.num_test}
    if evaluated and evaluated[0] is not None:  # rank 0, unless fast_dev_run
        results |= evaluated[0]
    if folder.checkpoints():  # none with fast_dev_run
        results["reevaluate"] = reevaluate_command(folder.path)


def _say_where(folder: RunFolder, results: dict[str, Any]) -> None:
    """The run's clean error, its headline (the best known medians, with intervals), folder
    and re-evaluation command, on the console and in the log."""
    log.info("clean test error %.4f; run folder: %s", results["clean"]["error"], folder.path)
    if "evaluation" in results:
        log.info("evaluation: %s", headline(results))
        print(f"Evaluation: {headline(results)}")
    print(f"Run folder: {folder.path.resolve()}")
    if "reevaluate" in results:
        log.info("re-evaluate: %s", results["reevaluate"])
        print(f"Re-evaluate: {results['reevaluate']}")
