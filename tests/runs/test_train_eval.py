"""Training runs end to end with their robustness evaluation: a defended model is more
robust, and evaluate.py (evaluate_checkpoint) reproduces the end-of-training evaluation."""

import json

import numpy as np
import pytest
import torch

from lipexp.evaluation.curves import error_curve
from lipexp.runs.reevaluate import evaluate_checkpoint
from lipexp.runs.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defended_model_is_more_robust_than_undefended(make_cfg, tmp_path):
    """Same seed and budget on digits: J2-Lip2 & tanh has a larger median l2 distance."""
    common = ["recipe.epochs=15", "recipe.milestones=[10]", "logger=none",
              "eval.n_images=120", "attacks=[l2_pgd]", "attacks.l2_pgd.targets=3"]
    undefended = run(make_cfg("adv=j0", "lip=none", "head=linear", *common,
                              output_dir=tmp_path / "j0"))
    defended = run(make_cfg("adv=j2", "lip=lip2", "head=tanh", *common,
                            output_dir=tmp_path / "j2"))
    m0 = undefended["attacks"]["l2_pgd"]["median"]
    m1 = defended["attacks"]["l2_pgd"]["median"]
    assert 0 < m0 < m1
    assert defended["clean"]["error"] <= 0.06


def test_mode_eval_reproduces_the_end_of_training_evaluation(make_cfg, tmp_path):
    overrides = ["trainer.max_epochs=2", "logger=none", "eval.n_images=40",
                 "attacks=[l2_pgd,linf_pgd]"]
    trained = run(make_cfg(*overrides, output_dir=tmp_path / "train"))
    out = tmp_path / "train"
    for name in ("error_curves.csv", "distances.npz", "error_curves.png", "results.json"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["attacks"]) == {"l2_pgd", "linf_pgd"}
    for key in ("median", "n_unbroken", "error_at", "curve", "settings", "norm"):
        assert key in saved["attacks"]["l2_pgd"]
    assert set(saved["stability"]) >= {"grad_loss_l2", "jac_2_inf", "grad_loss_l1", "jac_1_1"}

    evaluation = ["eval.n_images=40", "attacks=[l2_pgd,linf_pgd]", "logger=none"]
    cfg = make_cfg(f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", *evaluation,
                   output_dir=tmp_path / "eval")
    evaluated = evaluate_checkpoint(cfg, overrides=evaluation)  # as on a command line
    assert evaluated["attacks"] == trained["attacks"]
    assert evaluated["stability"] == trained["stability"]
    a = np.load(out / "distances.npz")
    b = np.load(tmp_path / "eval" / "distances.npz")
    np.testing.assert_array_equal(a["l2_pgd"], b["l2_pgd"])
    np.testing.assert_array_equal(a["indices"], np.arange(40))

    # the Lipschitz analysis of a trained model: the bounds bracket, and no certified radius
    # exceeds an adversarial example that PGD found (docs/method.md, "Guarantees")
    lipschitz = saved["lipschitz"]
    assert 0 < lipschitz["empirical_l2"]["jacobian_max"] <= lipschitz["upper_bound_l2"]
    assert lipschitz["empirical_l2"]["grad_loss_max"] == saved["stability"]["grad_loss_l2"]["max"]
    for norm in ("l2", "linf"):
        assert (a[f"certified_{norm}"] <= a[f"{norm}_pgd"]).all()
        assert (a[f"certified_{norm}"] > 0).any()
        assert lipschitz["certified"][norm]["violations"] == 0
        curve = lipschitz["certified"][norm]["curve"]
        np.testing.assert_array_equal(curve["error"],
                                      error_curve(a[f"certified_{norm}"], curve["eps"]))
        # not certified >= broken by PGD, at every size: the certified curve bounds the error
        assert (error_curve(a[f"certified_{norm}"], curve["eps"])
                >= error_curve(a[f"{norm}_pgd"], curve["eps"])).all()
    assert evaluated["lipschitz"] == trained["lipschitz"]


def test_a_checkpoint_of_an_earlier_lipexp_is_evaluated_the_same(make_cfg, tmp_path):
    """Checkpoints written before the renaming (adv target ``l2_step``, lip target
    ``lipschitz_penalty`` with key ``norm``, scheduler=none without a target) still build
    their network in an evaluation, with the same numbers as today's checkpoint."""
    overrides = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=none",
                 "model.width=8", "eval.n_images=12", "attacks=[l2_pgd]",
                 "attacks.l2_pgd.steps=3", "attacks.l2_pgd.targets=1"]
    run(make_cfg(*overrides, output_dir=tmp_path / "train"))
    new = tmp_path / "train" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(new, weights_only=False)
    config = checkpoint["lipexp_config"]
    config["adv"]["_target_"] = "lipexp.defences.adversarial.l2_step"
    config["lip"]["_target_"] = "lipexp.defences.lipschitz.lipschitz_penalty"
    config["lip"]["norm"] = config["lip"].pop("dual_norm")
    config["scheduler"] = {}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    results = {}
    for name, path in [("new", new), ("old", old)]:
        cfg = make_cfg(f"ckpt_path={path}", *overrides[2:],
                       output_dir=tmp_path / name)
        results[name] = evaluate_checkpoint(cfg, overrides=overrides[2:])
    assert results["old"]["status"] == "completed"
    assert results["old"]["config"]["lip"]["dual_norm"] == 2
    assert results["old"]["attacks"] == results["new"]["attacks"]
