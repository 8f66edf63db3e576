"""The attacks of an evaluation: each maps test images to per-image adversarial distances.

Every attack has ``norm`` (the norm its distances are measured in), ``fixed_size`` (None,
or the one size at which a fixed-size check runs) and ``distances(model, x, y) -> (B,)``:
0 for an image misclassified clean, the attack's adversarial distance otherwise, +inf when
it never succeeded. The model is an argument, never stored; every call runs in eval mode
and leaves the model's modes, parameters and parameter gradients as it found them.
"""

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torchattacks
from torch import Tensor, nn

from lipexp.attacks.pgd import PGD
from lipexp.attacks.search import adversarial_distances, first_order_distance
from lipexp.attacks.threat import THREATS, Norm
from lipexp.utils import eval_mode

TORCHATTACKS_NORM = {Norm.l2: "L2", Norm.linf: "Linf"}
AUTOATTACK_VERSIONS = ("standard", "plus", "rand")  # torchattacks.AutoAttack's


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters without requires_grad, and their ``.grad`` restored afterwards.

    torchattacks' optimisation-based attacks (CW) call ``loss.backward()``, which would
    otherwise accumulate into the parameters' gradients.
    """
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _full_precision(x: Tensor):
    """Success checks in full precision, also under the evaluation's bf16 autocast."""
    return torch.autocast(x.device.type, enabled=False)


def _clean_wrong(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad(), _full_precision(x):
        return model(x).argmax(1) != y


def _minimal_norm_distances(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor,
                            norm: Norm) -> Tensor:
    """``||x_adv - x||`` where ``x_adv`` is misclassified, +inf where not, 0 if wrong clean."""
    x_adv = x_adv.detach()
    with torch.no_grad(), _full_precision(x):
        broken = model(x_adv).argmax(1) != y
    d = torch.where(broken, THREATS[norm].norm(x_adv - x), torch.full_like(y, torch.inf,
                                                                              dtype=x.dtype))
    return torch.where(_clean_wrong(model, x, y), torch.zeros_like(d), d)


@dataclass(frozen=True)
class PGDSearch:
    """PGD at a per-image size found by search (``lipexp.attacks.search``); with one step
    and ``rel_step=1`` it is FGSM (linf) or the gradient attack (l2)."""

    norm: Norm
    steps: int = 20
    rel_step: float = 2.5  # step size = rel_step * eps / steps
    targets: int = 9
    eps_init: float = 0.01  # smallest first size, in the attack's norm, pixels in [0, 1]
    eps_max: float = 20.0  # largest size searched
    rtol: float = 0.02
    fixed_size: None = field(default=None, init=False)
    _pgd: PGD | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm(self.norm))
        if not 0 < self.eps_init <= self.eps_max or not 0 < self.rtol < 1:
            raise ValueError(f"PGDSearch needs 0 < eps_init <= eps_max and 0 < rtol < 1, got "
                             f"{self.eps_init}, {self.eps_max}, {self.rtol}")
        # Built (and its settings checked) now, when the run starts, not after training.
        object.__setattr__(self, "_pgd", PGD(self.norm, steps=self.steps,
                                             rel_step=self.rel_step, targets=self.targets))

    def distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Each image's search starts at its first-order distance estimate (at least
        eps_init): a start near the answer saves the rounds of growing from far below."""
        attack = self._pgd
        start = first_order_distance(model, x, y, self.norm).clamp(min=self.eps_init)
        return adversarial_distances(model, x, y, attack, self.norm, start, self.eps_max,
                                     self.rtol)


@dataclass(frozen=True)
class DeepFool:
    """DeepFool (torchattacks), l2: the distance is the size of the perturbation it finds."""

    steps: int = 50
    overshoot: float = 0.02
    norm: Norm = field(default=Norm.l2, init=False)
    fixed_size: None = field(default=None, init=False)

    def __post_init__(self) -> None:
        _check(self.steps >= 1 and self.overshoot >= 0,
               f"DeepFool needs steps >= 1 and overshoot >= 0, got {self.steps}, {self.overshoot}")

    def distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(model), frozen_parameters(model):
            x_adv = torchattacks.DeepFool(model, steps=self.steps, overshoot=self.overshoot)(x, y)
            return _minimal_norm_distances(model, x, x_adv.clamp(0, 1), y, self.norm)


@dataclass(frozen=True)
class CarliniWagner:
    """Carlini-Wagner l2 (torchattacks): the distance is the size of the perturbation found."""

    c: float = 1.0
    kappa: float = 0.0
    steps: int = 100
    lr: float = 0.01
    norm: Norm = field(default=Norm.l2, init=False)
    fixed_size: None = field(default=None, init=False)

    def __post_init__(self) -> None:
        _check(self.c > 0 and self.kappa >= 0 and self.steps >= 1 and self.lr > 0,
               f"CarliniWagner needs c > 0, kappa >= 0, steps >= 1, lr > 0, got c={self.c}, "
               f"kappa={self.kappa}, steps={self.steps}, lr={self.lr}")

    def distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(model), frozen_parameters(model):
            attack = torchattacks.CW(model, c=self.c, kappa=self.kappa, steps=self.steps,
                                     lr=self.lr)
            return _minimal_norm_distances(model, x, attack(x, y), y, self.norm)


@dataclass(frozen=True)
class SquareGrid:
    """Square attack (torchattacks, black box) at each size of a grid, smallest first: an
    image's distance is the smallest grid size that breaks it (an upper bound)."""

    norm: Norm = Norm.linf
    sizes: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
    n_queries: int = 1000
    p_init: float = 0.8
    seed: int = 0
    fixed_size: None = field(default=None, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm(self.norm))
        object.__setattr__(self, "sizes", tuple(sorted(float(s) for s in self.sizes)))
        _check(len(self.sizes) > 0 and self.sizes[0] > 0 and self.n_queries >= 1
               and 0 < self.p_init <= 1, "SquareGrid needs positive sizes, n_queries >= 1 and "
               f"0 < p_init <= 1, got {self.sizes}, {self.n_queries}, {self.p_init}")

    def distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(model), frozen_parameters(model):
            d = torch.full((len(x),), torch.inf, dtype=x.dtype, device=x.device)
            d[_clean_wrong(model, x, y)] = 0.0
            for eps in self.sizes:
                todo = torch.isinf(d).nonzero().flatten()
                if len(todo) == 0:
                    break
                attack = torchattacks.Square(model, norm=TORCHATTACKS_NORM[self.norm], eps=eps,
                                             n_queries=self.n_queries, p_init=self.p_init,
                                             seed=self.seed)
                x_adv = attack(x[todo], y[todo])
                with torch.no_grad(), _full_precision(x):
                    broken = model(x_adv).argmax(1) != y[todo]
                d[todo[broken]] = eps
            return d


@dataclass(frozen=True)
class AutoAttack:
    """AutoAttack (torchattacks) at one size: a trusted check of the error at ``eps``.

    Distances are 0 (wrong clean), ``eps`` (broken at eps: an upper bound) or +inf, so only
    the error at ``eps`` is reported, not a median or a curve.
    """

    norm: Norm = Norm.linf
    eps: float = 8 / 255
    version: str = "standard"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm(self.norm))
        _check(self.eps > 0, f"AutoAttack needs eps > 0, got {self.eps}")
        _check(self.version in AUTOATTACK_VERSIONS,
               f"AutoAttack version must be one of {AUTOATTACK_VERSIONS}, got {self.version!r}")

    @property
    def fixed_size(self) -> float:
        return self.eps

    def distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(model), frozen_parameters(model):
            n_classes = model(x[:1]).shape[1]
            attack = torchattacks.AutoAttack(model, norm=TORCHATTACKS_NORM[self.norm],
                                             eps=self.eps, version=self.version,
                                             n_classes=n_classes, seed=self.seed)
            x_adv = attack(x, y)
            d = _minimal_norm_distances(model, x, x_adv, y, self.norm)
            return torch.where(torch.isfinite(d) & (d > 0), torch.full_like(d, self.eps), d)


def settings(attack: object) -> dict:
    """The attack's settings, JSON-ready, for results.json."""
    out = {"attack": type(attack).__name__}
    for f in dataclasses.fields(attack):
        if f.name.startswith("_"):
            continue
        value = getattr(attack, f.name)
        out[f.name] = value.value if isinstance(value, Norm) else value
    return out
