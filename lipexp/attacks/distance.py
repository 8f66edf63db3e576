"""The attacks of an evaluation: each maps test images to per-image adversarial distances.

Every attack is a ``DistanceAttack``: ``distances(model, x, y) -> (B,)`` gives 0 for an
image misclassified clean, the attack's adversarial distance (in ``norm``, pixels in
[0, 1]) otherwise, +inf when it never succeeded. The model is an argument, never stored;
every call runs in eval mode with frozen parameters and leaves the model's modes,
``requires_grad`` flags and parameter gradients as it found them (docs/method.md,
"Evaluation protocol").
"""

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum

import torch
import torchattacks
from torch import Tensor, nn

from lipexp.attacks.first_order import first_order_distance, first_order_distances
from lipexp.attacks.fmn import FMN
from lipexp.attacks.pgd import PGD, to_norm
from lipexp.attacks.search import adversarial_distances
from lipexp.attacks.threat import THREATS, Norm
from lipexp.errors import require
from lipexp.model_state import eval_mode, frozen_parameters

TORCHATTACKS_NORM = {Norm.l2: "L2", Norm.linf: "Linf"}
AUTOATTACK_VERSIONS = ("standard", "plus", "rand")  # torchattacks.AutoAttack's


class DistanceAttack(ABC):
    """The contract of an evaluation attack; subclasses are frozen dataclasses of settings.

    - ``norm``: the norm its distances are measured in;
    - ``fixed_size``: None when the distances are per-image minimal sizes (an error curve
      and a median follow), or the one size of a fixed-size check (e.g. AutoAttack: only
      the error at that size is reported);
    - ``weak``: it must never beat the ``reference`` attack of its norm (a black-box or
      one-step attack); if it does, the gradient-masking checks warn (checks.py);
    - ``reference``: the strong white-box attack of its norm that the checks compare with.
    """

    norm: Norm
    fixed_size: float | None = None
    weak: bool = False
    reference: bool = False

    def distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Per-image adversarial distances (B,) of images ``x`` (B, C, H, W) in [0, 1] with
        labels ``y`` (B,); the model in eval mode, its parameters frozen, both restored."""
        with eval_mode(model), frozen_parameters(model):
            return self._distances(model, x, y)

    @abstractmethod
    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """``distances`` once the model is in eval mode with frozen parameters."""

    def settings(self) -> dict:
        """``{"attack": class name, field: value, ...}``, JSON-ready, for results.json
        (enums as their value, private fields left out)."""
        out = {"attack": type(self).__name__, "fixed_size": self.fixed_size}
        for f in dataclasses.fields(self):
            if not f.name.startswith("_"):
                value = getattr(self, f.name)
                out[f.name] = value.value if isinstance(value, Enum) else value
        return out


def _misclassified(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``argmax f(x) != y`` (B,), in full precision even under the evaluation's bf16 autocast:
    a success is never decided by a rounding of the logits."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return model(x).argmax(1) != y


def _minimal_norm_distances(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor,
                            norm: Norm) -> Tensor:
    """``||x_adv - x||`` where ``x_adv`` is misclassified, +inf where not, 0 if wrong clean."""
    x_adv = x_adv.detach()
    inf = torch.full((len(x),), torch.inf, dtype=x.dtype, device=x.device)
    d = torch.where(_misclassified(model, x_adv, y), THREATS[norm].norm(x_adv - x), inf)
    return torch.where(_misclassified(model, x, y), torch.zeros_like(d), d)


class TargetOrder(str, Enum):
    """Which wrong classes PGD's targeted runs aim at, first to last."""

    logit = "logit"  # the highest clean logits (lipexp <= 0.3)
    nearest = "nearest"  # the smallest first-order distances (lipexp.attacks.first_order)


RANK_CANDIDATES = 9  # TargetOrder.nearest ranks the 9 highest wrong logits (all classes
# on 10): one backward pass each, which on 100 classes would cost more than the attack


@dataclass(frozen=True)
class PGDSearch(DistanceAttack):
    """PGD at a per-image size found by search (``lipexp.attacks.search``); with one step
    and ``rel_step=1`` it is FGSM (linf) or the gradient attack (l2).

    Each image's search starts at its first-order distance estimate (at least
    ``eps_init``): a start near the answer saves the rounds of growing from far below.
    With ``target_order=nearest`` the estimate is the smallest over the ``RANK_CANDIDATES``
    most likely wrong classes, and the targeted runs aim at the ``targets`` classes with the
    smallest estimates (DeepFool's choice, exact for a linear model), ranked once per image
    rather than at every size; ``early_stop`` ends each image's PGD run at its first
    success (the search needs success at a size, not the smallest example there).

    Iterative (``steps > 1``): the reference attack of its norm. One step: a weak attack,
    which must never break more images than the reference at any size.

    Example: d = PGDSearch("l2", steps=10).distances(model, x, y)  # (B,) l2 distances
    """

    norm: Norm
    steps: int = 10
    rel_step: float = 2.5  # step size = rel_step * eps / steps
    targets: int = 3
    eps_init: float = 0.01  # smallest first size, in the attack's norm, pixels in [0, 1]
    eps_max: float = 20.0  # largest size searched
    rtol: float = 0.02
    factor: float = 1.25  # the search's first step from the estimate (x or / 1.25)
    early_stop: bool = True
    target_order: TargetOrder = TargetOrder.nearest
    _pgd: PGD | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm(self.norm))
        object.__setattr__(self, "target_order", TargetOrder(self.target_order))
        require(0 < self.eps_init <= self.eps_max and 0 < self.rtol < 1
                and 1 < self.factor <= 2,
                f"PGDSearch needs 0 < eps_init <= eps_max, 0 < rtol < 1 and 1 < factor <= 2, "
                f"got {self.eps_init}, {self.eps_max}, {self.rtol}, {self.factor}")
        # Built (and its settings checked) now, when the run starts, not after training.
        object.__setattr__(self, "_pgd", PGD(self.norm, steps=self.steps,
                                             rel_step=self.rel_step, targets=self.targets,
                                             early_stop=self.early_stop))

    @property
    def weak(self) -> bool:
        return self.steps == 1

    @property
    def reference(self) -> bool:
        return self.steps > 1

    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        targets = None  # TargetOrder.logit: PGD ranks them at each size
        if self.target_order == TargetOrder.nearest and self.targets:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                logits = model(x)
            wrong = logits.scatter(1, y[:, None], -torch.inf)  # (B, K), y excluded
            pool = wrong.topk(min(max(self.targets, RANK_CANDIDATES), wrong.shape[1] - 1),
                              dim=1).indices  # (B, C)
            d = first_order_distances(model, x, y, pool, self.norm)  # (B, C)
            targets = pool.gather(1, d.argsort(dim=1, stable=True))  # nearest first
            start = d.amin(dim=1)
        else:
            start = first_order_distance(model, x, y, self.norm)
        return adversarial_distances(model, x, y, self._pgd, self.norm,
                                     start.clamp(min=self.eps_init), self.eps_max, self.rtol,
                                     targets=targets, factor=self.factor)


@dataclass(frozen=True)
class FMNAttack(DistanceAttack):
    """FMN (Pintor et al. 2021; lipexp.attacks.fmn): the distance is the norm of the
    smallest misclassified iterate, 0 for an image misclassified clean, +inf when none.

    Neither weak nor reference: its distances are upper bounds of the true ones, like
    PGD's, found another way: a cross-check of the PGD search. Cost per image: FMN's
    ``1 + targets * (steps + 1) + 1`` forward passes (``steps + 2`` with ``targets=0``;
    ``targets`` at most classes - 1), two more here (the returned point and the clean
    image checked by ``_minimal_norm_distances``), and ``targets * steps`` backward
    passes; by default 238 and 225.

    Example: d = FMNAttack("linf", steps=25).distances(model, x, y)  # (B,) linf distances
    """

    norm: Norm
    steps: int = 25  # per run
    targets: int = 9  # runs towards the most likely wrong classes; 0: one untargeted run
    alpha_init: float = 1.0  # first step length, a fraction of the radius eps_k
    alpha_final: float = 0.01  # last one (cosine-annealed in between)
    gamma_init: float = 0.05  # first relative change of the radius eps_k per step
    gamma_final: float = 0.001  # last one
    _fmn: FMN | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", to_norm(self.norm))
        # Built (and its settings checked) now, when the run starts, not after training.
        object.__setattr__(self, "_fmn", FMN(self.norm, steps=self.steps, targets=self.targets,
                                             alpha_init=self.alpha_init,
                                             alpha_final=self.alpha_final,
                                             gamma_init=self.gamma_init,
                                             gamma_final=self.gamma_final))

    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv, _ = self._fmn(model, x, y)
        return _minimal_norm_distances(model, x, x_adv, y, self.norm)


@dataclass(frozen=True)
class DeepFool(DistanceAttack):
    """DeepFool (torchattacks), l2: the distance is the size of the perturbation it finds.

    Example: d = DeepFool(steps=50).distances(model, x, y)  # (B,) l2 distances
    """

    steps: int = 50
    overshoot: float = 0.02
    norm: Norm = field(default=Norm.l2, init=False)

    def __post_init__(self) -> None:
        require(self.steps >= 1 and self.overshoot >= 0,
                f"DeepFool needs steps >= 1 and overshoot >= 0, got {self.steps}, "
                f"{self.overshoot}")

    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = torchattacks.DeepFool(model, steps=self.steps, overshoot=self.overshoot)(x, y)
        return _minimal_norm_distances(model, x, x_adv.clamp(0, 1), y, self.norm)


@dataclass(frozen=True)
class CarliniWagner(DistanceAttack):
    """Carlini-Wagner l2 (torchattacks): the distance is the size of the perturbation found.

    Example: d = CarliniWagner(c=1.0, steps=100).distances(model, x, y)  # (B,) l2 distances
    """

    c: float = 1.0
    kappa: float = 0.0
    steps: int = 100
    lr: float = 0.01
    norm: Norm = field(default=Norm.l2, init=False)

    def __post_init__(self) -> None:
        require(self.c > 0 and self.kappa >= 0 and self.steps >= 1 and self.lr > 0,
                f"CarliniWagner needs c > 0, kappa >= 0, steps >= 1, lr > 0, got c={self.c}, "
                f"kappa={self.kappa}, steps={self.steps}, lr={self.lr}")

    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        attack = torchattacks.CW(model, c=self.c, kappa=self.kappa, steps=self.steps,
                                 lr=self.lr)
        return _minimal_norm_distances(model, x, attack(x, y), y, self.norm)


@dataclass(frozen=True)
class SquareGrid(DistanceAttack):
    """Square attack (torchattacks, black box) at each size of a grid, smallest first: an
    image's distance is the smallest grid size that breaks it (an upper bound). Weak: a
    black-box attack that beats the white-box reference signals gradient masking.

    Example: d = SquareGrid(sizes=(2 / 255, 8 / 255)).distances(model, x, y)  # (B,) linf
    """

    norm: Norm = Norm.linf
    sizes: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
    n_queries: int = 1000
    p_init: float = 0.8
    seed: int = 0
    weak = True  # a class attribute, not a setting

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm(self.norm))
        object.__setattr__(self, "sizes", tuple(sorted(float(s) for s in self.sizes)))
        require(len(self.sizes) > 0 and self.sizes[0] > 0 and self.n_queries >= 1
                and 0 < self.p_init <= 1, "SquareGrid needs positive sizes, n_queries >= 1 "
                f"and 0 < p_init <= 1, got {self.sizes}, {self.n_queries}, {self.p_init}")

    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        d = torch.full((len(x),), torch.inf, dtype=x.dtype, device=x.device)
        d[_misclassified(model, x, y)] = 0.0
        for eps in self.sizes:
            todo = torch.isinf(d).nonzero().flatten()
            if len(todo) == 0:
                break
            attack = torchattacks.Square(model, norm=TORCHATTACKS_NORM[self.norm], eps=eps,
                                         n_queries=self.n_queries, p_init=self.p_init,
                                         seed=self.seed)
            broken = _misclassified(model, attack(x[todo], y[todo]), y[todo])
            d[todo[broken]] = eps
        return d


@dataclass(frozen=True)
class AutoAttack(DistanceAttack):
    """AutoAttack (torchattacks) at one size: a trusted check of the error at ``eps``.

    Distances are 0 (wrong clean), ``eps`` (broken at eps: an upper bound) or +inf, so only
    the error at ``eps`` is reported, not a median or a curve.

    Example: d = AutoAttack(eps=0.3).distances(model, x, y)  # (B,): 0, eps or +inf
    """

    norm: Norm = Norm.linf
    eps: float = 8 / 255
    version: str = "standard"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm(self.norm))
        require(self.eps > 0, f"AutoAttack needs eps > 0, got {self.eps}")
        require(self.version in AUTOATTACK_VERSIONS,
                f"AutoAttack version must be one of {AUTOATTACK_VERSIONS}, got {self.version!r}")

    @property
    def fixed_size(self) -> float:
        return self.eps

    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        attack = torchattacks.AutoAttack(model, norm=TORCHATTACKS_NORM[self.norm],
                                         eps=self.eps, version=self.version,
                                         n_classes=n_classes, seed=self.seed)
        d = _minimal_norm_distances(model, x, attack(x, y), y, self.norm)
        return torch.where(torch.isfinite(d) & (d > 0), torch.full_like(d, self.eps), d)
