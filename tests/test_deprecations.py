"""Old spellings keep working: renamed keys, resolvers and configs of earlier versions."""

import subprocess
import sys
import warnings

import pytest
import yaml
from omegaconf import OmegaConf

from lipexp.deprecations import CONSTANT_LR, rename_keys, upgrade_run_config

from .conftest import REPO


@pytest.mark.parametrize("arg,new", [("lip.norm=1", "lip.dual_norm=1"),
                                     ("+lip.norm=1", "lip.dual_norm=1"),
                                     ("lip.norm=1,2", "lip.dual_norm=1,2"),
                                     ("lip.lam=0.1", "lip.lam=0.1")])
def test_renamed_keys_are_rewritten_with_a_notice(arg, new):
    args, said = rename_keys(["adv=j2", arg])
    assert args == ["adv=j2", new]
    assert (said == []) == (arg == new)
    if said:
        assert "lip.norm is deprecated: use lip.dual_norm" in said[0]


def test_run_py_takes_the_old_key():
    printed = subprocess.run([sys.executable, "run.py", "--cfg", "job", "lip=lip1", "lip.norm=2"],
                             cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
    assert yaml.safe_load(printed.stdout)["lip"]["dual_norm"] == 2


def test_old_resolver_names_still_resolve(make_cfg):
    cfg = make_cfg("logger=wandb")
    node = OmegaConf.create({"adv": OmegaConf.to_container(cfg.adv, resolve=True),
                             "lip": OmegaConf.to_container(cfg.lip, resolve=True),
                             "head": OmegaConf.to_container(cfg.head, resolve=True),
                             "model": OmegaConf.to_container(cfg.model, resolve=True),
                             "old_name": "${run_label:${adv},${lip},${head},${model},0}",
                             "old_tags": "${defence_tags:${adv},${lip},${head}}",
                             "name": "${wandb_name:${adv},${lip},${head},${model},0}",
                             "tags": "${wandb_tags:${adv},${lip},${head}}"})
    with pytest.warns(FutureWarning, match="deprecated"):
        assert node.old_name == node.name == "J2-Lip2 & tanh / small_cnn / seed 0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert list(node.old_tags) == list(node.tags) == ["J2", "Lip2", "tanh"]


def test_the_composed_config_resolves_with_every_logger():
    """``--cfg job --resolve`` (README's way to see every value) works with W&B's list of
    tags, which a plain-list resolver would break."""
    printed = subprocess.run([sys.executable, "run.py", "--cfg", "job", "--resolve",
                              "logger=wandb"], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=120)
    assert yaml.safe_load(printed.stdout)["logger"]["tags"] == ["J2", "Lip2", "tanh"]


def test_the_constant_lr_of_old_configs_is_scheduler_none():
    none = yaml.safe_load((REPO / "conf" / "scheduler" / "none.yaml").read_text())
    assert none == CONSTANT_LR


def test_old_run_configs_are_upgraded():
    old = {"adv": {"_target_": "lipexp.defences.adversarial.fgsm", "eps": 0.01},
           "lip": {"_target_": "lipexp.defences.lipschitz.lipschitz_penalty", "norm": 1},
           "scheduler": {}, "eval": {"_target_": "lipexp.evaluation.callback.RobustnessEvaluation"},
           "attacks": {"deepfool": {"_target_": "lipexp.evaluation.attacks.DeepFool"}}}
    new = upgrade_run_config(old)
    assert new["adv"]["_target_"] == "lipexp.defences.adversarial.signed_gradient_step"
    assert new["lip"] == {"_target_": "lipexp.defences.lipschitz.penalized_cross_entropy",
                          "dual_norm": 1,  # and the settings added since, as they ran then:
                          "h": 0.01, "reuse_adv_gradient": False,  # the exact penalty
                          "direction": "attack"}  # (unused by it)
    assert new["scheduler"] == CONSTANT_LR
    assert new["eval"]["_target_"] == "lipexp.evaluation.runner.Evaluator"
    assert new["attacks"] == {
        "l2_deepfool": {"_target_": "lipexp.evaluation.distance_attacks.DeepFool"}}
    assert old["lip"]["norm"] == 1  # a copy: the caller's config is left as it was


def test_fd_runs_of_lipexp_0_4_took_the_direction_at_the_point():
    """lipexp 0.4's fd took d from the gradient at the point: an upgraded 0.4 fd config says
    so, and resuming it with today's default (along the attack's gradient) is a
    difference the folder check reports, not a silent change of estimator."""
    from lipexp.runfolder import config_differences

    old = {"lip": {"_target_": "lipexp.defences.lipschitz.penalized_cross_entropy",
                   "dual_norm": 2, "method": "fd", "h": 0.01, "reuse_adv_gradient": False}}
    assert upgrade_run_config(old)["lip"]["direction"] == "point"
    today = {"lip": {**old["lip"], "direction": "attack"}}
    assert config_differences(old, today, older_version=True) == [
        "lip.direction: 'point' -> 'attack'"]
    assert config_differences(old, {"lip": {**old["lip"], "direction": "point"}},
                              older_version=True) == []


def test_the_pgd_search_of_old_configs_is_the_one_that_ran():
    """lipexp <= 0.3 ran every PGD search with 0.3's settings (l2_pgd_full's); configs of
    today's attacks state their settings, which the upgrade leaves alone."""
    search = "lipexp.evaluation.distance_attacks.PGDSearch"
    old = {"attacks": {"l2_pgd": {"_target_": search, "norm": "l2", "steps": 20},
                       "l2_deepfool": {"_target_": "lipexp.evaluation.distance_attacks.DeepFool"}}}
    new = upgrade_run_config(old)
    assert new["attacks"]["l2_pgd"] == {"_target_": search, "norm": "l2", "steps": 20,
                                        "factor": 2.0, "early_stop": False,
                                        "target_order": "logit"}
    assert new["attacks"]["l2_deepfool"] == old["attacks"]["l2_deepfool"]
    for name in ("l2_pgd", "linf_pgd", "l2_pgd_full", "linf_pgd_full", "l2_gradient",
                 "linf_fgsm"):  # every PGDSearch config says what it runs
        today = yaml.safe_load((REPO / "conf" / "attacks" / f"{name}.yaml").read_text())
        assert upgrade_run_config({"attacks": {name: today}})["attacks"][name] == today
