"""The evaluation runner on its own (lipexp.evaluation.runner.Evaluator), the training
callback that calls it, and the logging of its numbers."""

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import lipexp.evaluation.evaluate as evaluate_module
from lipexp.attacks.distance import PGDSearch
from lipexp.attacks.threat import Norm
from lipexp.data.datamodule import to_unit
from lipexp.evaluation.callback import RobustnessEvaluation
from lipexp.evaluation.evaluate import evaluate
from lipexp.evaluation.intervals import DESCRIPTION
from lipexp.evaluation.runner import Evaluator

RESULT_KEYS = {"evaluation", "attacks", "stability", "checks", "files",
               "lipschitz", "ensemble"}
OUTPUTS = {"error_curves.csv", "error_curves.png", "distances.npz"}


class TinyData:
    """Anything with ``test_set()``: 16 uint8 images of 1 x 4 x 4 pixels, 3 classes."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (16, 1, 4, 4), generator=g, dtype=torch.uint8)
        self.y = torch.randint(0, 3, (16,), generator=g)

    def test_set(self):
        return self.x, self.y


class Recorder:
    """A logger that keeps what it is given (any Lightning logger has log_metrics)."""

    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append(metrics)


def untimed(results: dict) -> dict:
    """``results`` without the files and the wall times (which differ from run to run);
    the passes of each attack stay."""
    out = {k: v for k, v in results.items() if k != "files"}
    cost = {name: {k: v for k, v in c.items() if k not in ("seconds", "images_per_s")}
            for name, c in results["evaluation"]["cost"].items()}
    out["evaluation"] = results["evaluation"] | {"cost": cost}
    return out


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


def attacks():
    return {"l2_pgd": PGDSearch("l2", steps=3, targets=0),
            "linf_fgsm": PGDSearch("linf", steps=1, rel_step=1.0, targets=0, eps_init=5e-4,
                                   eps_max=1.0)}


def evaluator(**kw):
    return Evaluator(attacks(), n_images=10, batch_size=4, error_at_l2=(0.0, 0.1),
                     error_at_linf=(8 / 255,), grid_points=20, **kw)


def test_evaluator_writes_the_outputs_and_returns_the_results(tmp_path, device):
    """On the network's device; the comparisons with evaluate() are exact (the same code on
    the same device and threads), the clean error recomputed in the runner's batches of 4."""
    net, data, logger = tiny_net().to(device), TinyData(), Recorder()
    results = evaluator()(net, data, tmp_path / "run", logger)
    assert set(results) == RESULT_KEYS
    assert {p.name for p in (tmp_path / "run").iterdir()} == OUTPUTS  # no temporary files
    assert {k: Path(v).name for k, v in results["files"].items()} == {
        "curves_csv": "error_curves.csv", "distances": "distances.npz",
        "figure": "error_curves.png"}

    # the first n_images test images, as evaluate() itself sees them
    direct = evaluate(net, data.x[:10], data.y[:10], attacks(), batch_size=4, grid_points=20,
                      error_at_sizes={Norm.l2: [0.0, 0.1], Norm.linf: [8 / 255]},
                      lipschitz_iterations=20)
    assert untimed(results) == untimed(direct.results)
    assert results["evaluation"]["n_images"] == 10
    assert set(results["attacks"]["l2_pgd"]["error_at"]) == {"0", "0.1"}
    assert set(results["attacks"]["linf_fgsm"]["error_at"]) == {"0.03137255"}
    with torch.no_grad():
        logits = torch.cat([net(to_unit(xb.to(device))) for xb in data.x[:10].split(4)])
        wrong = (logits.argmax(1).cpu() != data.y[:10]).double().mean().item()
    assert results["evaluation"]["clean_error"] == wrong
    saved = np.load(tmp_path / "run" / "distances.npz")
    np.testing.assert_array_equal(saved["indices"], np.arange(10))
    np.testing.assert_array_equal(saved["l2_pgd"], direct.distances["l2_pgd"])
    np.testing.assert_array_equal(saved["certified_l2"], direct.certified["certified_l2"])
    with open(tmp_path / "run" / "error_curves.csv", newline="") as f:
        assert {r["attack"] for r in csv.DictReader(f)} == {
            "l2_pgd", "linf_fgsm", "certified (upper bound on error) l2",
            "certified (upper bound on error) linf"}

    # the logger gets the flat summary numbers
    (logged,) = logger.logged
    assert logged["test/eval_clean_error"] == results["evaluation"]["clean_error"]
    assert logged["test/l2_pgd_median"] == results["attacks"]["l2_pgd"]["median"]
    assert logged["test/linf_fgsm_error@0.03137255"] == (
        results["attacks"]["linf_fgsm"]["error_at"]["0.03137255"])
    assert logged["test/lipschitz_upper"] == results["lipschitz"]["upper_bound_l2"]
    assert logged["test/certified_l2_median"] == results["lipschitz"]["certified"]["l2"]["median"]
    assert logged["test/jac_2_inf_max"] == results["stability"]["jac_2_inf"]["max"]
    assert not any("scale" in k for k in logged)


def test_evaluator_takes_all_images_when_n_images_is_none(tmp_path, device):
    results = Evaluator(attacks(), grid_points=10)(tiny_net().to(device), TinyData(), tmp_path)
    evaluation = {k: v for k, v in results["evaluation"].items()
                  if k not in ("clean_error", "clean_error_interval", "cost")}
    assert evaluation == {"n_images": 16, "batch_size": 500, "bf16": False,
                          "intervals": DESCRIPTION}
    low, high = results["evaluation"]["clean_error_interval"]
    assert low <= results["evaluation"]["clean_error"] <= high
    assert set(results["evaluation"]["cost"]) == {"l2_pgd", "linf_fgsm"}


def fake_trainer(data, fast_dev_run=False):
    """What the callback reads of a Lightning Trainer."""
    return SimpleNamespace(fast_dev_run=fast_dev_run, datamodule=data, logger=None)


def test_callback_hands_the_results_to_on_done(tmp_path, device):
    net, data, done = tiny_net().to(device), TinyData(), []
    callback = RobustnessEvaluation(evaluator(), str(tmp_path), on_done=done.append)
    callback.on_train_end(fake_trainer(data), SimpleNamespace(net=net))
    (results,) = done
    assert set(results) == RESULT_KEYS and results["files"]["figure"].startswith(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS
    assert not hasattr(callback, "results") and not hasattr(callback, "done")


def test_callback_skips_fast_dev_run(tmp_path):
    done = []
    callback = RobustnessEvaluation(evaluator(), str(tmp_path / "run"), on_done=done.append)
    callback.on_train_end(fake_trainer(TinyData(), fast_dev_run=True),
                          SimpleNamespace(net=tiny_net()))
    assert done == [] and not (tmp_path / "run").exists()


def test_callback_calls_on_done_with_none_on_other_ranks(tmp_path, monkeypatch):
    """A data-parallel rank other than 0 attacks its share, writes nothing, and still hands
    over (None), so that every rank knows the evaluation has run."""
    monkeypatch.setattr(evaluate_module, "rank", lambda: 1)
    done = []
    callback = RobustnessEvaluation(evaluator(), str(tmp_path / "run"), on_done=done.append)
    callback.on_train_end(fake_trainer(TinyData()), SimpleNamespace(net=tiny_net()))
    assert done == [None] and not (tmp_path / "run").exists()


def test_callback_without_on_done(tmp_path):
    callback = RobustnessEvaluation(evaluator(), str(tmp_path))
    callback.on_train_end(fake_trainer(TinyData()), SimpleNamespace(net=tiny_net()))
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS


def test_an_attack_named_like_a_headline_number_is_refused():
    """test/l2_median is the best known distance: an attack named l2 would overwrite it."""
    for name in ("l2", "linf", "certified_l2"):
        with pytest.raises(ValueError, match=rf"attack name\(s\) \['{name}'\] are taken"):
            Evaluator({name: PGDSearch("l2", steps=2)})
    Evaluator({"l2_pgd2": PGDSearch("l2", steps=2)})  # any other name
