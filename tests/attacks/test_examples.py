"""Each attack's docstring ends with a one-line usage example (as torchattacks' do), and each
example runs as written on a tiny classifier and gives what its comment says."""

import ast
import inspect

import pytest
import torch

from lipexp.attacks import distance, first_order, fmn, pgd, search
from lipexp.attacks.distance import DistanceAttack

from ..helpers import linear_model

MODULES = (distance, pgd, fmn, first_order, search)
ATTACKS = (distance.PGDSearch, distance.FMNAttack, distance.DeepFool, distance.CarliniWagner,
           distance.SquareGrid, distance.AutoAttack, pgd.PGD, fmn.FMN,
           search.adversarial_distances, first_order.first_order_distances,
           first_order.first_order_distance)
B = 4  # images


def example(obj) -> str:
    """The code of the docstring's last line, ``Example: CODE``."""
    last = inspect.getdoc(obj).strip().splitlines()[-1]
    assert last.startswith("Example: "), f"{obj.__qualname__}: its docstring ends {last!r}"
    return last.removeprefix("Example: ")


def test_every_evaluation_attack_is_covered():
    """A new DistanceAttack in distance.py needs its example (and a place in ATTACKS)."""
    defined = {c for c in vars(distance).values() if isinstance(c, type)
               and issubclass(c, DistanceAttack) and c is not DistanceAttack
               and c.__module__ == distance.__name__}
    assert defined <= set(ATTACKS), defined - set(ATTACKS)


@pytest.fixture(scope="module")
def problem():
    """A linear classifier on 8x8 one-channel images in [0, 1] (the shape the torchattacks
    attacks accept), four images, the first labelled wrong so that it is misclassified
    clean (its distance must be 0); the others labelled as the model predicts."""
    model = linear_model(64, 10, seed=0)
    x = torch.rand(B, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10
    return model, x, y


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.__name__)
def test_docstring_example_runs(attack, problem):
    model, x, y = problem
    code = example(attack)
    namespace = {name: value for module in MODULES for name, value in vars(module).items()
                 if not name.startswith("_")}
    namespace |= {"model": model, "x": x, "y": y}
    exec(compile(code, f"<{attack.__name__} example>", "exec"), namespace)
    (assign,) = ast.parse(code).body
    names = [t.id for t in (assign.targets[0].elts if isinstance(assign.targets[0], ast.Tuple)
                            else assign.targets)]
    if names == ["x_adv", "success"]:  # a fixed-size attack: the examples and their success
        x_adv, success = namespace["x_adv"], namespace["success"]
        assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
        assert success.dtype == torch.bool and success.shape == (B,)
        with torch.no_grad():
            assert torch.equal(success, model(x_adv).argmax(1) != y)
        return
    assert names == ["d"], code
    d = namespace["d"]
    assert d.shape[0] == B and not d.isnan().any() and (d >= 0).all(), d
    if d.dim() == 1:
        assert d[0] == 0 and (d[1:] > 0).all(), d  # the wrong image, the others need a push
