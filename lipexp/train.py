"""One run: build everything from the config, train, test, write results.json."""

import json
import logging
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from lipexp.config import validate
from lipexp.defences.lipschitz import needs_double_backward
from lipexp.evaluation.callback import RobustnessEvaluation
from lipexp.module import RobustClassifier
from lipexp.utils import write_json_atomic

log = logging.getLogger(__name__)


class RunFolderError(RuntimeError):
    """The run folder holds a run that this command would overwrite or cannot resume."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict[str, Any]:
    """Versions and the lipexp commit, so every number can be traced to its code."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "lipexp_commit": commit,
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "pytorch_lightning": pl.__version__,
        "command": sys.argv,
    }


def read_results(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def build_module(cfg: DictConfig) -> RobustClassifier:
    """The LightningModule of a run config (training, or a checkpoint's own config)."""
    return RobustClassifier(
        model=instantiate(cfg.model),
        head=instantiate(cfg.head),
        perturb=instantiate(cfg.adv),
        objective=instantiate(cfg.lip),
        optimizer=instantiate(cfg.optimizer),
        # scheduler=none: no _target_ (a recipe may still have set milestones there)
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler.get("_target_") else None,
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        provenance=provenance(),
    )


def build(cfg: DictConfig) -> tuple[RobustClassifier, pl.LightningDataModule, pl.Trainer]:
    """Instantiate module, data module and trainer; no data is read yet."""
    module = build_module(cfg)
    if cfg.trainer.get("sync_batchnorm") and needs_double_backward(module.objective):
        raise ValueError(
            "trainer.sync_batchnorm=true cannot be combined with the exact Lipschitz penalty "
            "(lip.method=exact): PyTorch has no double backward through SyncBatchNorm. Keep "
            "batch normalization per rank (trainer.sync_batchnorm=false) or use lip=none."
        )
    datamodule = instantiate(cfg.data)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [evaluation_callback(cfg)]
    logger = instantiate(cfg.logger) if cfg.logger else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    return module, datamodule, trainer


def evaluation_callback(cfg: DictConfig) -> RobustnessEvaluation:
    # Hydra instantiates the attacks recursively; "partial" hands them over as a plain dict
    return instantiate(cfg.eval, attacks=cfg.attacks, output_dir=cfg.paths.output_dir,
                       _convert_="partial")


def _check_run_folder(cfg: DictConfig, results_path: Path, last: Path) -> dict | None:
    """The completed results of this folder, or None when work is to be done; refuses to
    overwrite an unfinished run (RunFolderError)."""
    previous = read_results(results_path)
    if previous is not None and previous.get("status") == "completed":
        log.info("%s is already completed; nothing to do (delete it to run again)",
                 results_path.parent)
        return previous
    if cfg.resume and not last.exists():
        raise RunFolderError(f"resume=true but there is no {last} to resume from")
    if not cfg.resume and last.exists():
        raise RunFolderError(
            f"{results_path.parent} holds an unfinished run ({last}); pass resume=true to "
            "continue it, or delete the folder to start again"
        )
    return None


DDP_ARGV = "LIPEXP_DDP_ARGV"  # read by run.py in DDP child processes


def pin_ddp_children_to_this_job(out: Path) -> None:
    """Lightning's DDP launcher starts ranks 1..N-1 by re-running ``sys.argv``, which under
    ``-m`` would run the whole sweep again, in the wrong folders. Record this job's own
    overrides and folder; run.py gives them to the children instead."""
    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
        os.environ[DDP_ARGV] = json.dumps(
            [*overrides, f'hydra.run.dir="{out}"', "hydra.output_subdir=null"])


DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def end_process_group(env_before: dict[str, str]) -> None:
    """Undo what Lightning's DDP launch leaves behind, so that the next job of a sweep (in
    this process, with new ranks) starts its own: the process group, and the environment
    variables that would make it believe its ranks were already launched."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in DDP_ENV:
        if key in env_before:
            os.environ[key] = env_before[key]
        else:
            os.environ.pop(key, None)


def _container(cfg: DictConfig) -> dict:
    """The resolved config as plain data (unresolved where it cannot be resolved)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:  # a bad value: keep what the user wrote, for the failure record
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and evaluate one configuration in ``cfg.paths.output_dir``.

    The folder belongs to the command: a completed run is not trained again, an unfinished
    one continues only with ``resume=true``, and nothing in it is overwritten otherwise.
    Any failure after that check (a bad value included) is recorded in results.json with
    ``status: failed`` and re-raised, so a sweep's folder says why each job stopped.
    """
    out = Path(cfg.paths.output_dir)
    results_path, last = out / "results.json", out / "checkpoints" / "last.ckpt"
    previous = _check_run_folder(cfg, results_path, last)
    if previous is not None:
        return previous

    is_zero = rank_zero_only.rank == 0  # DDP children of this job are ranks >= 1
    results: dict[str, Any] = {"status": "running", "config": _container(cfg),
                               "output_dir": str(out.resolve()), "started": _now(),
                               "provenance": provenance()}
    env_before = dict(os.environ)
    logger = None
    try:
        validate(cfg)  # range checks of the typed schemas, before any work
        pin_ddp_children_to_this_job(out)
        pl.seed_everything(cfg.seed, workers=True)
        module, datamodule, trainer = build(cfg)
        logger = trainer.logger
        if is_zero:
            write_json_atomic(results_path, results)
        if logger is not None:
            logger.log_hyperparams(module.config)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if cfg.resume else None)
        evaluation = next(c for c in trainer.callbacks if isinstance(c, RobustnessEvaluation))
        if not evaluation.done and not trainer.fast_dev_run:
            # Resuming a run whose training had finished: Lightning skips the fit loop and
            # its on_train_end, so evaluate here (after fit, the module is on the CPU).
            module.to(trainer.strategy.root_device)
            evaluation.run(module, datamodule, trainer.logger)
        results["trained"] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        (test,) = trainer.test(module, datamodule=datamodule, verbose=False)
        results["clean"] = {"error": 1.0 - test["test/acc"], "loss": test["test/loss"]}
        results["data"] = {"n_train": datamodule.num_train, "n_test": datamodule.num_test}
        results |= evaluation.results or {}
        results.update(status="completed", finished=_now())
    except BaseException as e:  # recorded, then re-raised: the folder says why it stopped
        results.update(status="failed", error=f"{type(e).__name__}: {e}", finished=_now())
        raise
    finally:
        if is_zero:
            write_json_atomic(results_path, results)
        if isinstance(logger, WandbLogger):  # always close the W&B run: the next job opens its own
            import wandb

            wandb.finish(exit_code=0 if results["status"] == "completed" else 1)
        end_process_group(env_before)
    if is_zero:
        log.info("clean test error %.4f; run folder: %s", results["clean"]["error"], out)
        print(f"Run folder: {out.resolve()}")
    return results


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """``mode=eval``: the robustness evaluation of ``cfg.ckpt_path`` with the checkpoint's own
    config; only ``eval``, ``attacks`` and the output folder come from this command."""
    validate(cfg)
    if not cfg.ckpt_path or not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"mode=eval needs ckpt_path=PATH of a checkpoint, got "
                                f"{cfg.ckpt_path!r}")
    out = Path(cfg.paths.output_dir)
    results_path = out / "results.json"
    checkpoint = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False)
    if "lipexp_config" not in checkpoint:
        raise ValueError(f"{cfg.ckpt_path} has no lipexp_config: not a lipexp checkpoint")
    run_cfg = OmegaConf.create(checkpoint["lipexp_config"])
    run_cfg.eval, run_cfg.attacks = cfg.eval, cfg.attacks
    run_cfg.paths.output_dir = str(out)
    if not Path(run_cfg.data.data_dir).exists():  # trained elsewhere: this command's folder
        run_cfg.data.data_dir = cfg.data.data_dir
    pl.seed_everything(run_cfg.seed, workers=True)
    module = build_module(run_cfg)
    module.load_state_dict(checkpoint["state_dict"])
    module.to("cuda" if torch.cuda.is_available() else "cpu")
    datamodule = instantiate(run_cfg.data)
    datamodule.setup("test")
    results: dict[str, Any] = {
        "status": "running", "mode": "eval", "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step"),
        "config": OmegaConf.to_container(run_cfg, resolve=True, enum_to_str=True),
        "output_dir": str(out.resolve()), "started": _now(), "provenance": provenance(),
        "training_provenance": checkpoint.get("lipexp_provenance"),
    }
    write_json_atomic(results_path, results)
    try:
        results |= evaluation_callback(run_cfg).run(module, datamodule)
        results.update(status="completed", finished=_now())
    except BaseException as e:
        results.update(status="failed", error=f"{type(e).__name__}: {e}", finished=_now())
        raise
    finally:
        write_json_atomic(results_path, results)
    print(f"Run folder: {out.resolve()}")
    return results
