"""Typed schemas of the Hydra config groups.

Each YAML file of a group lists its schema first in its defaults list
(``- /schema/adv/step@_here_``), so Hydra rejects a mistyped key or a value of the wrong
type while composing, and ``validate`` (``OmegaConf.to_object``, which runs the
``__post_init__`` range checks) rejects out-of-range values before any data is loaded.
Groups whose options differ in shape (model, trainer, logger) are checked by their
constructors, which ``train`` calls before touching the data.
"""

import dataclasses
import inspect
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

from lipexp.config.compat import RENAMED_KEYS
from lipexp.errors import require


class Scaling(str, Enum):
    """How the penalty scales the largest gradient norm of the minibatch (docs/method.md)."""

    per_example = "per_example"  # max_i ||grad_x l(x_i)||
    batch_mean = "batch_mean"  # the authors' code: grad of the batch-MEAN loss, i.e. / B


class Method(str, Enum):
    """How the input-gradient norm is computed (lipexp.defences.penalty.ESTIMATORS)."""

    exact = "exact"  # double backpropagation through the graph
    fd = "fd"  # finite difference (l(x + h d) - l(x)) / h along the normalized gradient d


class Direction(str, Enum):
    """Where the fd estimate's direction d comes from (docs/method.md)."""

    attack = "attack"  # the J1/J2 step's gradient (eval mode, clean image); J0: at the point
    point = "point"  # the gradient at the point of the estimate: one more backward pass


class BatchStats(str, Enum):
    """Which per-example gradient the penalty sees where batch norm uses batch statistics
    (``lip.batch_stats``; docs/method.md, "Which gradient the penalty sees: batch
    statistics live or fixed")."""

    live = "live"  # through the batch's mean and variance (exact's default, the authors')
    fixed = "fixed"  # the batch's statistics held as constants (what fd estimates)

    @staticmethod
    def of(method: "Method | str", batch_stats: "BatchStats | str | None") -> "BatchStats":
        """The statistics ``method`` runs with: ``batch_stats``, or (None) the method's own
        (exact: live, fd: fixed); ValueError for fd with live, which fd cannot estimate."""
        method = Method(method)
        if batch_stats is None:
            return BatchStats.fixed if method is Method.fd else BatchStats.live
        batch_stats = BatchStats(batch_stats)
        require(not (method is Method.fd and batch_stats is BatchStats.live),
                "lip.batch_stats=live cannot be combined with lip.method=fd: the finite "
                "difference holds the batch's statistics fixed (docs/method.md); use "
                "lip.batch_stats=fixed (or null), or lip.method=exact")
        return batch_stats


@dataclass
class NoAdvConfig:
    """J0: no adversarial perturbation."""

    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class AdvStepConfig:
    """J1 / J2: one-step perturbation of l2 size eps at the clean image."""

    _target_: str = MISSING
    _partial_: bool = True
    eps: float = 0.01  # l2 size, pixels in [0, 1] (the study's value, not tuned)
    clip: bool = True  # keep x + a in [0, 1]; the authors' code does not clip

    def __post_init__(self) -> None:
        require(self.eps >= 0, f"adv.eps must be >= 0 (an l2 size in pixels), got {self.eps}")


@dataclass
class NoLipConfig:
    """No Lipschitz penalty: plain cross-entropy."""

    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class LipConfig:
    """Lip1 / Lip2: lam * max over the batch of the input-gradient norm of the loss."""

    _target_: str = MISSING
    _partial_: bool = True
    dual_norm: int = 2  # the gradient's norm, dual of the attack's: 2 (l2), 1 (l-infinity)
    lam: float = 0.1  # penalty weight (the study: 0.1; divided by sqrt(n) for Lip1)
    lam_over_sqrt_n: bool = False  # Lip1: the weight used is lam / sqrt(input dimension)
    scaling: Scaling = Scaling.batch_mean
    target: float | None = None  # hinge max(0, L - target) when set
    squared: bool = False  # square the hinge
    method: Method = Method.exact
    h: float = 0.01  # fd: step of the finite difference (l2 size, pixels in [0, 1])
    direction: Direction = Direction.attack  # fd: where d comes from
    # fd with J1/J2: the attack's gradient taken in train mode and x + h d its adversarial
    # image (h = adv.eps), 2 forward passes per step instead of 3 (docs/method.md)
    reuse_adv_gradient: bool = False
    # batch norm's statistics in the gradient: live (through them) or fixed (constants);
    # None: the method's own (exact: live, fd: fixed); fd with live is refused
    batch_stats: BatchStats | None = None

    def __post_init__(self) -> None:
        require(self.h > 0, f"lip.h (the finite-difference step, l2 size in pixels) must be "
                f"> 0, got {self.h}")
        # fd's combinations with the attack and the trainer: lipexp.defences.compose.check_fd
        require(self.dual_norm in (1, 2), f"lip.dual_norm must be 1 (Lip1, dual of l-infinity) "
                f"or 2 (Lip2, dual of l2), got {self.dual_norm}")
        require(self.lam >= 0, f"lip.lam must be >= 0, got {self.lam}")
        BatchStats.of(self.method, self.batch_stats)  # fd with live: refused
        require(
            self.target is None or self.target >= 0,
            f"lip.target (hinge target L0) must be >= 0 or null, got {self.target}",
        )


def lip_config(node: Any) -> "LipConfig | NoLipConfig":
    """The typed lip config of a run's ``lip`` node (typed already, or a checkpoint's plain
    config: a penalty has ``dual_norm``), its checks run."""
    schema = LipConfig if "dual_norm" in node else NoLipConfig
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


@dataclass
class DataConfig:
    """An ``ImageDataModule`` over one ``lipexp.data.sources`` loader."""

    _target_: str = "lipexp.data.datamodule.ImageDataModule"
    source: Any = MISSING  # {_target_: lipexp.data.sources.NAME, _partial_: true}
    num_classes: int = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING  # pixels per side
    data_dir: str = MISSING
    download: bool = True
    batch_size: int = 128  # per process
    eval_batch_size: int = 500
    num_workers: int = 0
    crop_padding: int = 0  # pixels of zero padding before the random crop, 0 = off
    flip: bool = False  # random horizontal flip
    cutout: int = 0  # side of the cutout square in pixels, 0 = off
    on_device: bool = False  # keep the training set on the GPU (refused without one)

    # range checks: ImageDataModule's constructor (built right after validate, before data)


@dataclass
class EvalConfig:
    """The robustness evaluation at the end of a run (``lipexp.evaluation``)."""

    _target_: str = "lipexp.evaluation.runner.Evaluator"
    n_images: int | None = None  # the first n test images; None: all
    batch_size: int = 500
    error_at_l2: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.5, 1.5])
    error_at_linf: list[float] = field(default_factory=lambda: [2 / 255, 8 / 255])
    grid_points: int = 100
    bf16: bool = False
    lipschitz: bool = True  # the Lipschitz analysis: bounds and certified radii
    jacobian_iterations: int = 20  # power iterations per image for ||J(x)||_2
    progress: bool = True  # a progress bar per attack (images done, time left)
    # images per norm pictured with their adversarial examples (pictures.py); 0: none
    pictures: int = 8

    def __post_init__(self) -> None:
        require(self.pictures >= 0, f"eval.pictures must be >= 0 (0: none), got {self.pictures}")
        require(self.jacobian_iterations >= 1,
                f"eval.jacobian_iterations must be >= 1, got {self.jacobian_iterations}")
        require(self.n_images is None or self.n_images > 0,
                f"eval.n_images must be > 0 or null (all), got {self.n_images}")
        require(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")
        require(self.grid_points >= 2, f"eval.grid_points must be >= 2, got {self.grid_points}")
        sizes = [*self.error_at_l2, *self.error_at_linf]
        require(all(s >= 0 for s in sizes), f"eval.error_at_* sizes must be >= 0, got {sizes}")


@dataclass
class RecipeConfig:
    """The training schedule of a data set (docs/method.md, "Training recipe"): the one place
    these numbers live; trainer, optimizer and scheduler read them by interpolation."""

    epochs: int = MISSING  # trainer.max_epochs
    lr: float = MISSING  # optimizer.lr, the initial learning rate
    weight_decay: float = MISSING  # optimizer.weight_decay: SGD's, = 2 x the loss term's decay
    milestones: list[int] = MISSING  # scheduler.milestones: epochs where lr is multiplied
    gamma: float = MISSING  # scheduler.gamma: by this factor

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"recipe.epochs must be >= 1, got {self.epochs}")
        require(self.lr > 0, f"recipe.lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0,
                f"recipe.weight_decay must be >= 0, got {self.weight_decay}")
        require(all(m >= 0 for m in self.milestones) and list(self.milestones)
                == sorted(self.milestones), "recipe.milestones must be increasing epochs >= 0, "
                f"got {list(self.milestones)}")
        require(0 < self.gamma <= 1, f"recipe.gamma must be in (0, 1], got {self.gamma}")


@dataclass
class Config:
    """The root: one key per group, plus the run's own settings."""

    data: Any = MISSING
    model: Any = MISSING
    head: Any = MISSING
    adv: Any = MISSING
    lip: Any = MISSING
    recipe: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = field(default_factory=dict)
    eval: Any = MISSING
    attacks: Any = field(default_factory=dict)  # name -> attack (conf/attacks/)
    ckpt_path: str | None = None  # evaluate.py: the checkpoint to evaluate
    paths: Any = MISSING
    seed: int = 0
    resume: bool = False  # continue this run's folder from its last.ckpt
    name: str = "lipexp"  # run and sweep name (W&B group, folder names)


def register() -> None:
    """Put the schemas into Hydra's ConfigStore and lipexp's resolvers into OmegaConf
    (idempotent); run.py and the tests call it before composing."""
    from lipexp.config.resolvers import register_resolvers

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="schema/adv", name="none", node=NoAdvConfig)
    cs.store(group="schema/adv", name="step", node=AdvStepConfig)
    cs.store(group="schema/lip", name="none", node=NoLipConfig)
    cs.store(group="schema/lip", name="penalty", node=LipConfig)
    cs.store(group="schema/data", name="image", node=DataConfig)
    cs.store(group="schema/eval", name="default", node=EvalConfig)
    cs.store(group="schema/recipe", name="recipe", node=RecipeConfig)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(node: Any, path: str) -> None:
    """Keys added with ``+key=value`` must exist in the node's schema or its target's signature.

    Hydra's ``+`` adds keys even to typed nodes and ``to_object`` drops them silently, and a
    ``_partial_`` target would only fail when first called, deep inside training.
    """
    if not isinstance(node, DictConfig):
        return
    keys = [str(k) for k in node]
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        allowed = {f.name for f in dataclasses.fields(schema)}
        extra = sorted(set(keys) - allowed)
        key = _join(path, extra[0]) if extra else ""
        renamed = f" (renamed: use {RENAMED_KEYS[key]})" if key in RENAMED_KEYS else ""
        require(not extra, f"{key} is not a setting of {path or 'the config'}{renamed}; "
                f"allowed: {', '.join(sorted(allowed - {'_target_', '_partial_'}))}")
    if node.get("_partial_", False) and "_target_" in node:
        params = inspect.signature(get_object(node._target_)).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in keys if not k.startswith("_") and k not in params]
        require(accepts_any or not unknown,
               f"{_join(path, unknown[0] if unknown else '')} is not an argument of "
               f"{node._target_}; "
               f"allowed: {', '.join(p for p in params if p not in ('model', 'x', 'y'))}")
    for k in keys:
        _check_keys(node._get_node(k), _join(path, k))


def as_plain_dict(cfg: DictConfig) -> dict:
    """The resolved config as plain data (as written, unresolved, where a value cannot be
    resolved: a failure record must still say what the user asked for)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:  # any resolution error: keep the config as written
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def validate(cfg: DictConfig) -> None:
    """Reject unknown keys and run every schema's range checks; ValueError names the key."""
    _check_keys(cfg, "")
    OmegaConf.to_object(cfg)

