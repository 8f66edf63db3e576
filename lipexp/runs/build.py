"""The objects of a run, each built from its config group: the LightningModule, the data
module, the evaluation and the Trainer. Building reads no data."""

import os
import warnings

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lipexp.config.schema import as_plain_dict, lip_config
from lipexp.data.datamodule import ImageDataModule
from lipexp.defences.compose import check_fd, compose
from lipexp.defences.penalty import needs_double_backward
from lipexp.errors import require
from lipexp.evaluation.runner import Evaluator
from lipexp.lipschitz.model_bounds import unsupported_layers
from lipexp.module import RobustClassifier
from lipexp.runs.provenance import provenance

MODEL_OPTIONS = ("channels_last", "compile")  # model keys that configure training, not layers


def build_module(cfg: DictConfig, training: bool = True) -> RobustClassifier:
    """The LightningModule of a run config (training, or a checkpoint's own config); with
    ``eval.lipschitz``, refuses a network with a layer that has no Lipschitz rule now rather
    than after training. ``training=False`` (an evaluation of a checkpoint): the trainer's
    settings, which it does not use, are not checked against the penalty."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    # Speed options of the model (+model.channels_last, +model.compile): the module's, not
    # the constructor's.
    options = {k: bool(model_cfg.pop(k, False)) for k in MODEL_OPTIONS}
    perturb, objective, lip = instantiate(cfg.adv), instantiate(cfg.lip), lip_config(cfg.lip)
    check_fd(lip, perturb, cfg.trainer if training else None)  # before any data is read
    # fd with J1/J2 takes the clean batch and the attack's gradient; anything else is
    # returned as it is.
    perturb, objective = compose(perturb, objective, lip)
    if options["compile"] and cfg.lip.get("method") == "fd" \
            and not cfg.lip.get("reuse_adv_gradient"):
        warnings.warn("model.compile=true with lip.method=fd: the penalty's passes run on the "
                      "uncompiled network (they swap batch norm's forward to hold its "
                      "statistics fixed, which would recompile it at every step); only the "
                      "J1/J2 step's gradient is compiled, none of a J0 step (docs/method.md)",
                      stacklevel=2)
    module = RobustClassifier(
        model=instantiate(model_cfg),
        head=instantiate(cfg.head),
        perturb=perturb,
        objective=objective,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        config=as_plain_dict(cfg),
        provenance=provenance(),
        full_precision_backward=cfg.lip.get("method") == "fd",  # no TF32 (docs/method.md)
        **options,
    )
    missing = unsupported_layers(module.net) if cfg.eval.get("lipschitz") else []
    require(not missing, f"eval.lipschitz=true, but the model has layers without a Lipschitz "
            f"rule ({', '.join(missing)}): add one in lipexp/lipschitz/model_bounds.py or set "
            "eval.lipschitz=false")
    return module


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    return instantiate(cfg.data)


def build_evaluator(cfg: DictConfig) -> Evaluator:
    """The robustness evaluation of ``cfg.eval`` with the attacks of ``cfg.attacks``."""
    # Hydra instantiates the attacks recursively; "partial" hands them over as a plain dict
    return instantiate(cfg.eval, attacks=cfg.attacks, _convert_="partial")


def check_slurm_tasks(strategy: object, devices: object, num_nodes: object) -> None:
    """DDP in a SLURM job: each SLURM task is one rank. Lightning's SLURM environment takes
    the ranks from ``SLURM_PROCID``/``SLURM_NTASKS`` and starts no process itself, and unlike
    its own launcher it never checks them against ``trainer.devices x trainer.num_nodes``; a
    mismatch (or ``python run.py trainer=ddp`` in the batch script without ``srun``) waits at
    the rendezvous for ranks that never come, or trains a world of the wrong size. So it is
    refused here (docs/scaling.md, "SLURM: one run"). Single-device strategies do not form a world
    and are left alone, as are device counts Lightning resolves itself (``auto``, ``-1``, a
    list of GPUs)."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    ntasks = os.environ.get("SLURM_NTASKS")
    if "ddp" not in str(strategy).lower() or not ntasks or not SLURMEnvironment.detect():
        return  # no world to form, or not in a SLURM job (a login node, an interactive shell)
    if isinstance(devices, int) and devices > 0 and isinstance(num_nodes, int):
        require(devices * num_nodes == int(ntasks),
                f"trainer.devices={devices} x trainer.num_nodes={num_nodes} = "
                f"{devices * num_nodes} ranks, but the SLURM job has SLURM_NTASKS={ntasks} tasks: "
                "one task per GPU, started by srun: srun python run.py ... "
                "trainer.devices=$SLURM_NTASKS_PER_NODE trainer.num_nodes=$SLURM_NNODES")


def build_trainer(cfg: DictConfig, module: RobustClassifier,
                  callbacks: list[pl.Callback]) -> pl.Trainer:
    """The Trainer of ``cfg.trainer`` with the checkpoint callbacks of ``cfg.callbacks``, the
    given ``callbacks`` and the logger of ``cfg.logger``; refuses settings that cannot train
    ``module``."""
    if cfg.trainer.get("sync_batchnorm") and needs_double_backward(module.objective):
        raise ValueError(
            "trainer.sync_batchnorm=true cannot be combined with the exact Lipschitz penalty "
            "(lip.method=exact): PyTorch has no double backward through SyncBatchNorm. Keep "
            "batch normalization per rank (trainer.sync_batchnorm=false) or use lip=none."
        )
    check_slurm_tasks(cfg.trainer.get("strategy"), cfg.trainer.get("devices"),
                      cfg.trainer.get("num_nodes", 1))
    unlimited = cfg.trainer.get("max_epochs") in (None, -1)  # Lightning: -1 = no limit
    require(not unlimited or (cfg.trainer.get("max_steps") or -1) > 0
            or cfg.trainer.get("max_time") is not None,
            f"trainer.max_epochs={cfg.trainer.get('max_epochs')} trains without end (and never "
            "evaluates): set trainer.max_epochs >= 0, or +trainer.max_steps / +trainer.max_time")
    checkpoints = [instantiate(c) for c in cfg.callbacks.values()]
    logger = instantiate(cfg.logger) if cfg.logger else False
    return instantiate(cfg.trainer, callbacks=[*checkpoints, *callbacks], logger=logger)
