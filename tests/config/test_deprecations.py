"""Old spellings: old command-line names are refused with the new one; old resolvers, run
configs and run folders of earlier versions still read, through one chain of upgrades."""

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import yaml
from hydra.utils import get_object
from omegaconf import OmegaConf

from lipexp.config.compat import (
    CONSTANT_LR,
    RENAMED_CHOICES,
    UPGRADES,
    old_name_errors,
    upgrade_results,
    upgrade_run_config,
    version_tuple,
)

from ..helpers import FIXTURES, REPO


@pytest.mark.parametrize("overrides,refusals", [
    (["adv=l2"], ["adv=l2 was renamed: use adv=j2"]),
    (["lip=l1", "head=tanh"], ["lip=l1 was renamed: use lip=lip1"]),
    (["attacks=[l2_pgd,fgsm,cw]"], ["attacks fgsm was renamed: use linf_fgsm",
                                     "attacks cw was renamed: use l2_cw"]),
    (["-m", "adv=j1,none"], ["adv=none was renamed: use adv=j0"]),  # a sweep's options too
    (["attacks.deepfool.steps=3"], ["attacks.deepfool was renamed: use attacks.l2_deepfool"]),
    (["lip.norm=1"], ["lip.norm was renamed: use lip.dual_norm"]),
    (["+lip.norm=1,2"], ["lip.norm was renamed: use lip.dual_norm"]),
    (["+defence=j2_lip2"], ["+defence=j2_lip2 was renamed: use defence=j2_lip2 (no '+': "
                            "defence is in the defaults list)"]),
    # today's names, a path that holds an old name, Hydra's options: nothing to refuse
    (["adv=j2", "lip=lip2", "defence=j0_lip1", "attacks=[linf_fgsm,l2_cw]", "lip.dual_norm=1",
      "ckpt_path=outputs/adv=l2,lip=l1/checkpoints/last.ckpt", "--cfg", "job"], []),
])
def test_old_names_are_refused_with_the_new_one(overrides, refusals):
    assert old_name_errors(overrides) == refusals


OLD_CHOICES = [(g, old, new) for g, renamed in RENAMED_CHOICES.items()
               for old, new in renamed.items()]


@pytest.mark.parametrize("group,old,new", OLD_CHOICES, ids=[f"{g}={o}" for g, o, _ in OLD_CHOICES])
def test_every_old_choice_is_gone_and_named_by_its_refusal(group, old, new):
    """The alias files are deleted (an old name cannot compose by accident), and the refusal
    names an option that exists."""
    assert not (REPO / "conf" / group / f"{old}.yaml").exists()
    assert (REPO / "conf" / group / f"{new}.yaml").is_file()
    override = f"attacks=[{old}]" if group == "attacks" else f"{group}={old}"
    (refusal,) = old_name_errors([override])
    assert refusal.endswith(f"use {new}" if group == "attacks" else f"use {group}={new}")


@pytest.mark.parametrize("old,refusal", [("lip.norm=2", "lip.norm was renamed: use lip.dual_norm"),
                                         ("adv=fgsm", "adv=fgsm was renamed: use adv=j1")])
def test_run_py_refuses_an_old_name_in_one_line(tmp_path, old, refusal):
    """Before Hydra starts: a non-zero exit, one line on stderr, no folder."""
    proc = subprocess.run([sys.executable, "run.py", old, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [refusal]
    assert not (tmp_path / "run").exists()


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
    assert new["lip"] == {"_target_": "lipexp.defences.penalty.penalized_cross_entropy",
                          "dual_norm": 1,  # and the settings added since, as they ran then:
                          "h": 0.01, "reuse_adv_gradient": False,  # the exact penalty
                          "direction": "attack",  # (unused by it)
                          "batch_stats": None}  # the method's own statistics (live)
    assert new["scheduler"] == CONSTANT_LR
    assert new["eval"]["_target_"] == "lipexp.evaluation.runner.Evaluator"
    assert new["attacks"] == {
        "l2_deepfool": {"_target_": "lipexp.attacks.distance.DeepFool"}}
    assert old["lip"]["norm"] == 1  # a copy: the caller's config is left as it was


def test_fd_runs_of_lipexp_0_4_took_the_direction_at_the_point():
    """lipexp 0.4's fd took d from the gradient at the point: an upgraded 0.4 fd config says
    so, and resuming it with today's default (along the attack's gradient) is a
    difference the folder check reports, not a silent change of estimator."""
    from lipexp.runs.differences import config_differences

    old = {"lip": {"_target_": "lipexp.defences.lipschitz.penalized_cross_entropy",
                   "dual_norm": 2, "method": "fd", "h": 0.01, "reuse_adv_gradient": False}}
    assert upgrade_run_config(old)["lip"]["direction"] == "point"
    # (the module moved in lipexp 0.6: the upgraded target is today's, not a difference)
    today = {"lip": {**old["lip"], "_target_": "lipexp.defences.penalty.penalized_cross_entropy",
                     "direction": "attack", "batch_stats": None}}
    assert config_differences(old, today, older_version=True) == [
        "lip.direction: 'point' -> 'attack'"]
    assert config_differences(old, {"lip": {**today["lip"], "direction": "point"}},
                              older_version=True) == []


def test_the_pgd_search_of_old_configs_is_the_one_that_ran():
    """lipexp <= 0.3 ran every PGD search with 0.3's settings (l2_pgd_full's); configs of
    today's attacks state their settings, which the upgrade leaves alone."""
    old_module = "lipexp.evaluation.distance_attacks"  # moved to lipexp.attacks.distance in 0.6
    old = {"attacks": {"l2_pgd": {"_target_": f"{old_module}.PGDSearch", "norm": "l2",
                                  "steps": 20},
                       "l2_deepfool": {"_target_": f"{old_module}.DeepFool"}}}
    new = upgrade_run_config(old)
    search = "lipexp.attacks.distance.PGDSearch"
    assert new["attacks"]["l2_pgd"] == {"_target_": search, "norm": "l2", "steps": 20,
                                        "factor": 2.0, "early_stop": False,
                                        "target_order": "logit"}
    assert new["attacks"]["l2_deepfool"] == {"_target_": "lipexp.attacks.distance.DeepFool"}
    for name in ("l2_pgd", "linf_pgd", "l2_pgd_full", "linf_pgd_full", "l2_gradient",
                 "linf_fgsm"):  # every PGDSearch config says what it runs
        today = yaml.safe_load((REPO / "conf" / "attacks" / f"{name}.yaml").read_text())
        assert upgrade_run_config({"attacks": {name: today}})["attacks"][name] == today


def test_the_chain_of_upgrades_starts_at_the_recorded_version():
    """Each step applies to what was written before its version only: a lipexp 0.4 fd run
    took its direction at the point, and a 0.5 results.json is not given 0.4's literal."""
    versions = [version_tuple(v) for v, _ in UPGRADES]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    fd = {"config": {"lip": {"_target_": "lipexp.defences.lipschitz.penalized_cross_entropy",
                             "dual_norm": 2, "method": "fd", "reuse_adv_gradient": False}}}
    at = {v: upgrade_results({**fd, "provenance": {"lipexp": v}})["config"]["lip"]
          for v in ("0.4.0", "0.5.0")}
    assert at["0.4.0"]["direction"] == "point"
    assert "direction" not in at["0.5.0"]  # not a step of 0.5's results
    for lip in at.values():  # the 0.6 module move applies to both
        assert lip["_target_"] == "lipexp.defences.penalty.penalized_cross_entropy"
    assert "direction" not in fd["config"]["lip"]  # a copy: the caller's dict is left alone
    # no recorded version: lipexp 0.1, every step (clean_error moved into "evaluation", 0.2)
    old = upgrade_results({"clean_error": 0.1, "evaluation": {"n_images": 20}})
    assert old == {"evaluation": {"n_images": 20, "clean_error": 0.1}}
    assert upgrade_results({"clean_error": 0.1, "evaluation": {},
                            "provenance": {"lipexp": "0.2.0"}})["clean_error"] == 0.1


@pytest.mark.parametrize("text,version", [("0.4.0", (0, 4, 0)), ("0.4", (0, 4, 0)),
                                          ("0.6.0.dev1", (0, 6, 0)), ("1.12.3", (1, 12, 3)),
                                          (None, (0, 1, 0)), ("unknown", (0, 1, 0))])
def test_versions_are_compared_as_numbers(text, version):
    assert version_tuple(text) == version


OLD_RUNS = ["0.3", "0.4"]  # tests/fixtures/run_<version>: results.json, .hydra/ of a real run


def _targets(node):
    """Every ``_target_`` in a nested config."""
    if isinstance(node, dict):
        yield from ([node["_target_"]] if isinstance(node.get("_target_"), str) else [])
        for value in node.values():
            yield from _targets(value)


@pytest.mark.parametrize("version", OLD_RUNS)
def test_a_real_old_run_folder_is_reported_with_todays_names(tmp_path, version):
    """tests/fixtures/run_0.3 and run_0.4: ``python run.py recipe.epochs=1 eval.n_images=20
    trainer.enable_progress_bar=false`` run by lipexp 0.3 (a347485) and 0.4 (fdccce1),
    results.json and .hydra/ only (provenance.lipexp set to the commit's pyproject version;
    the installed package had recorded its own)."""
    from lipexp.config.naming import run_label
    from lipexp.report import find_runs

    shutil.copytree(FIXTURES / f"run_{version}", tmp_path / "old")
    (run,) = find_runs(tmp_path)
    assert run.status == "completed" and run.results["provenance"]["lipexp"] == f"{version}.0"
    assert run_label(run.config) == "J2-Lip2 & tanh / small_cnn / seed 0"
    assert set(run.results["attacks"]) == set(run.config["attacks"]) == {"l2_pgd", "linf_pgd"}
    targets = set(_targets(run.config))
    assert targets and all(t.startswith(("lipexp.", "torch.", "pytorch_lightning."))
                           for t in targets)
    for target in targets:  # today's modules: every one imports
        get_object(target)


@pytest.mark.parametrize("version", OLD_RUNS)
def test_a_real_old_run_config_is_todays_same_run(make_cfg, version):
    """The old folder's config against today's config of its command (.hydra/overrides.yaml):
    for 0.4, no difference; for 0.3, only its PGD searches, which the 0.4 step fills with
    the frozen literals of 0.3's search (today's l2_pgd_full / linf_pgd_full), and which are
    no difference against today's config of those settings."""
    from lipexp.config.schema import as_plain_dict
    from lipexp.runs.differences import config_differences

    folder = FIXTURES / f"run_{version}"
    recorded = json.loads((folder / "results.json").read_text())["config"]
    overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    differences = config_differences(recorded, as_plain_dict(make_cfg(*overrides)),
                                     older_version=True)
    full = as_plain_dict(make_cfg("attacks=[l2_pgd_full,linf_pgd_full]"))["attacks"]
    searches = {f"attacks.{n}.{k}": v for n in ("l2_pgd", "linf_pgd")
                for k, v in full[f"{n}_full"].items() if k != "_target_"}
    today = as_plain_dict(make_cfg())["attacks"]
    changed = sorted(k for k, v in searches.items()
                     if today[k.split(".")[1]][k.split(".")[2]] != v)
    assert [d.split(":")[0] for d in differences] == (changed if version == "0.3" else [])
    assert {"attacks.l2_pgd.factor", "attacks.l2_pgd.early_stop"} <= set(changed)
    if version == "0.3":
        as_0_3 = [f"{k}={v}" for k, v in searches.items()]
        assert config_differences(recorded, as_plain_dict(make_cfg(*overrides, *as_0_3)),
                                  older_version=True) == []
