"""The contract of evaluation attacks (lipexp.attacks.distance.DistanceAttack):
declared flags, settings for results.json, range checks, and the model left as found."""

import json
from dataclasses import dataclass

import pytest
import torch
import yaml
from hydra.utils import instantiate
from torch import Tensor, nn

from lipexp.attacks.distance import (
    AutoAttack,
    CarliniWagner,
    DeepFool,
    DistanceAttack,
    FMNAttack,
    PGDSearch,
    SquareGrid,
)
from lipexp.attacks.threat import Norm

from ..helpers import REPO

# (attack, weak, reference): one-step and black-box attacks are weak, iterative PGD the
# reference of its norm, the minimal-norm and fixed-size attacks neither
FLAGS = [
    (PGDSearch("l2", steps=1, rel_step=1.0, targets=0), True, False),
    (PGDSearch("linf", steps=1, rel_step=1.0, targets=0, eps_init=5e-4, eps_max=1.0), True,
     False),
    (PGDSearch("l2", steps=20), False, True),
    (PGDSearch("linf", steps=20, eps_init=5e-4, eps_max=1.0), False, True),
    (SquareGrid(), True, False),
    (DeepFool(), False, False),
    (CarliniWagner(), False, False),
    (AutoAttack(), False, False),
    (FMNAttack("l2"), False, False),
    (FMNAttack("linf", steps=10, targets=0), False, False),
]


@pytest.mark.parametrize(("attack", "weak", "reference"), FLAGS)
def test_declared_flags(attack, weak, reference):
    assert isinstance(attack, DistanceAttack)
    assert (attack.weak, attack.reference) == (weak, reference)
    assert attack.fixed_size == (attack.eps if isinstance(attack, AutoAttack) else None)
    assert type(attack).distances is DistanceAttack.distances  # implemented once, in the base


@pytest.mark.parametrize("attack", [a for a, _, _ in FLAGS])
def test_settings_are_json_ready_and_name_the_class(attack):
    settings = attack.settings()
    assert settings["attack"] == type(attack).__name__
    assert settings["norm"] == attack.norm.value and isinstance(settings["norm"], str)
    assert not any(k.startswith("_") for k in settings)  # PGDSearch's built PGD left out
    assert json.loads(json.dumps(settings))["attack"] == type(attack).__name__


def test_settings_values():
    assert PGDSearch("linf", steps=1, eps_init=0.001, eps_max=1.0).settings() == {
        "attack": "PGDSearch", "fixed_size": None, "norm": "linf", "steps": 1, "rel_step": 2.5,
        "targets": 3, "eps_init": 0.001, "eps_max": 1.0, "rtol": 0.02, "factor": 1.25,
        "early_stop": True,
        "target_order": "nearest"}
    assert AutoAttack(eps=0.1).settings()["fixed_size"] == 0.1
    assert SquareGrid(sizes=(0.2, 0.1)).settings()["sizes"] == (0.1, 0.2)  # sorted


@pytest.mark.parametrize("build", [
    lambda: PGDSearch("l2", eps_init=0.0),
    lambda: PGDSearch("l2", eps_init=2.0, eps_max=1.0),
    lambda: PGDSearch("l2", rtol=1.0),
    lambda: PGDSearch("l1"),
    lambda: PGDSearch("l2", steps=0),
    lambda: PGDSearch("l2", targets=-1),
    lambda: PGDSearch("l2", target_order="farthest"),
    lambda: DeepFool(steps=0),
    lambda: DeepFool(overshoot=-0.1),
    lambda: CarliniWagner(c=0.0),
    lambda: CarliniWagner(lr=0.0),
    lambda: SquareGrid(sizes=()),
    lambda: SquareGrid(sizes=(0.0, 0.1)),
    lambda: SquareGrid(p_init=1.5),
    lambda: AutoAttack(eps=0.0),
    lambda: AutoAttack(version="standart"),
    lambda: FMNAttack("l2", steps=0),
    lambda: FMNAttack("l2", targets=-1),
    lambda: FMNAttack("linf", alpha_init=-1.0),
    lambda: FMNAttack("l2", alpha_final=2.0),
    lambda: FMNAttack("l2", gamma_init=1.0),
    lambda: FMNAttack("l1"),
])
def test_bad_settings_are_refused(build):
    with pytest.raises(ValueError):
        build()


@dataclass(frozen=True)
class Probe(DistanceAttack):
    """Records the model's state inside ``_distances``, then raises (or returns zeros)."""

    fail: bool = True
    norm: Norm = Norm.l2
    seen: list = None  # filled by _distances

    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        self.seen.append({"training": [m.training for m in model.modules()],
                          "requires_grad": [p.requires_grad for p in model.parameters()]})
        loss = model(x).sum()
        if any(p.requires_grad for p in model.parameters()):
            loss.backward()  # what an attack that leaks into parameter gradients does
        if self.fail:
            raise RuntimeError("attack failed")
        return torch.zeros(len(x))


@pytest.mark.parametrize("fail", [True, False])
def test_base_leaves_the_model_as_found(fail):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # mixed modes
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)  # a .grad to keep ...
    model[3].bias.requires_grad_(False)  # ... and a parameter frozen by its owner
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    probe = Probe(fail=fail, seen=[])
    x = torch.rand(3, 4)
    if fail:
        with pytest.raises(RuntimeError, match="attack failed"):
            probe.distances(model, x, torch.zeros(3, dtype=torch.long))
    else:
        probe.distances(model, x, torch.zeros(3, dtype=torch.long))
    (inside,) = probe.seen
    assert not any(inside["training"]) and not any(inside["requires_grad"])  # eval, frozen
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.5))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")


CONF = REPO / "conf" / "attacks"
OPTIONS = sorted(p.stem for p in CONF.glob("*.yaml")
                 if "_target_" in yaml.safe_load(p.read_text()))  # not deprecated spellings


def test_every_norm_has_its_options():
    assert {"l2_pgd", "linf_pgd", "linf_fgsm", "l2_gradient", "l2_deepfool", "l2_cw",
            "linf_square", "linf_autoattack", "l2_fmn", "linf_fmn"} <= set(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS)
def test_attack_configs_say_their_norm(option):
    """conf/attacks/<norm>_<attack>.yaml: its package is its file name and it builds a
    DistanceAttack of that norm."""
    text = (CONF / f"{option}.yaml").read_text()
    assert text.splitlines()[0] == f"# @package attacks.{option}"
    attack = instantiate(yaml.safe_load(text))
    assert isinstance(attack, DistanceAttack)
    assert option.split("_")[0] == attack.norm.value
