"""Old spellings that keep working: command-line choices renamed in lipexp 0.2, and the
configs stored in checkpoints and results.json files written before the renaming.

Each old choice is an alias file in its group (``conf/adv/fgsm.yaml`` composes
``conf/adv/j1.yaml``), so old scripts and the folders they named (``outputs/adv=fgsm``) still
work; ``notices`` turns the choices Hydra recorded into one line per old spelling, which
run.py prints before the run starts.
"""

import copy
from collections.abc import Mapping
from typing import Any

# group -> {old choice: new choice}
RENAMED_CHOICES: dict[str, dict[str, str]] = {
    # the study's names; adv=fgsm collided with the evaluation's l-infinity FGSM attack
    "adv": {"none": "j0", "fgsm": "j1", "l2": "j2"},
    "lip": {"l1": "lip1", "l2": "lip2"},
    # evaluation attacks carry their norm in their name
    "attacks": {"fgsm": "linf_fgsm", "gradient": "l2_gradient", "deepfool": "l2_deepfool",
                "cw": "l2_cw", "square_linf": "linf_square", "autoattack": "linf_autoattack"},
}

# keys renamed in lipexp 0.2: old dotted key -> new one
RENAMED_KEYS = {"lip.norm": "lip.dual_norm"}

# functions and classes renamed in lipexp 0.2: old ``_target_`` -> new ``_target_``
RENAMED_TARGETS = {
    "lipexp.defences.adversarial.fgsm": "lipexp.defences.adversarial.signed_gradient_step",
    "lipexp.defences.adversarial.l2_step": "lipexp.defences.adversarial.l2_gradient_step",
    "lipexp.defences.lipschitz.lipschitz_penalty":
        "lipexp.defences.lipschitz.penalized_cross_entropy",
    "lipexp.evaluation.callback.RobustnessEvaluation": "lipexp.evaluation.runner.Evaluator",
    **{f"lipexp.evaluation.attacks.{name}": f"lipexp.evaluation.distance_attacks.{name}"
       for name in ("PGDSearch", "DeepFool", "CarliniWagner", "SquareGrid", "AutoAttack")},
}
CONSTANT_LR = {"_target_": "torch.optim.lr_scheduler.ConstantLR", "_partial_": True,
               "factor": 1.0, "total_iters": 0}  # conf/scheduler/none.yaml


def rename_keys(args: list[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides with renamed keys spelled the new way (``lip.norm=1`` ->
    ``lip.dual_norm=1``, also with ``+``: the new key always exists), and a notice for each.
    run.py applies it before Hydra parses; the run folder is named by the new spelling."""
    out, said = [], []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~")
        if sep and bare in RENAMED_KEYS and not key.startswith("~"):
            new = RENAMED_KEYS[bare]
            prefix = "++" if key.startswith("++") else ""  # "+" would add an existing key
            out.append(f"{prefix}{new}={value}")
            said.append(f"{bare} is deprecated: use {new} (this run uses {new}={value}); the "
                        "old name will be removed in a later version")
        else:
            out.append(arg)
    return out, said


def chosen_options(choices: Mapping[str, Any], overrides: list[str]) -> dict[str, list]:
    """``group -> [options]`` of this job: Hydra's recorded choices, plus the options of list
    groups (``attacks=[...]``, which Hydra does not record) from the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    chosen = {group: [option] for group, option in choices.items()}
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "attacks" and not override.is_delete():
            value = override.value()
            chosen["attacks"] = list(value) if isinstance(value, list) else [value]
    return chosen


def notices(chosen: Mapping[str, list]) -> list[str]:
    """One line per old spelling among the ``chosen_options``, naming the new spelling."""
    out = []
    for group, renamed in RENAMED_CHOICES.items():
        for option in chosen.get(group, []):
            if option in renamed:
                kept = (f"; until then its results are named {option!r}"
                        if group == "attacks" else "")
                out.append(f"{group}={option} is deprecated: use {group}={renamed[option]} "
                           f"(the same settings{kept}); the old name will be removed in a "
                           "later version")
    return out


def attack_name(name: str) -> str:
    """Today's name of an evaluation attack (``fgsm`` -> ``linf_fgsm``; others unchanged)."""
    return RENAMED_CHOICES["attacks"].get(name, name)


def _sections(config: dict) -> list[dict]:
    """The config's group nodes, the attacks' nodes included."""
    attacks = config.get("attacks") if isinstance(config.get("attacks"), dict) else {}
    return [s for s in [*config.values(), *attacks.values()] if isinstance(s, dict)]


PGD_SEARCH = "lipexp.evaluation.distance_attacks.PGDSearch"
# the PGD search settings added in lipexp 0.4, at the values that ran before (l2_pgd_full)
PGD_SEARCH_0_3 = {"factor": 2.0, "early_stop": False, "target_order": "logit"}


def upgrade_run_config(config: dict) -> dict:
    """A copy of a resolved run config written by an earlier lipexp (a checkpoint's
    ``lipexp_config``, a results.json's ``config``) with today's targets, keys and attack
    names, so that it builds the same network and compares equal to today's configs."""
    config = copy.deepcopy(config)
    for section in _sections(config):
        if section.get("_target_") in RENAMED_TARGETS:
            section["_target_"] = RENAMED_TARGETS[section["_target_"]]
    lip = config.get("lip")
    if isinstance(lip, dict) and "norm" in lip:  # lip.norm was renamed lip.dual_norm
        lip["dual_norm"] = lip.pop("norm")
    scheduler = config.get("scheduler")
    if isinstance(scheduler, dict) and "_target_" not in scheduler:  # old scheduler=none
        config["scheduler"] = dict(CONSTANT_LR)
    if isinstance(config.get("attacks"), dict):
        config["attacks"] = {attack_name(k): v for k, v in config["attacks"].items()}
        for attack in config["attacks"].values():  # lipexp 0.4: the cheaper PGD search; what
            if isinstance(attack, dict) and attack.get("_target_") == PGD_SEARCH:  # ran before
                for key, value in PGD_SEARCH_0_3.items():  # was the full protocol
                    attack.setdefault(key, value)
    if isinstance(lip, dict) and "dual_norm" in lip:  # lipexp 0.3: the finite-difference
        lip.setdefault("h", 0.01)  # penalty's settings; what ran before was the exact one
        lip.setdefault("reuse_adv_gradient", False)
        # lipexp 0.5: where fd's direction comes from; before, fd took it at the point (an
        # estimator since changed: docs/method.md); the shared passes (reuse_adv_gradient)
        # take it from the attack, and the exact method has none
        point = lip.get("method") == "fd" and not lip.get("reuse_adv_gradient")
        lip.setdefault("direction", "point" if point else "attack")
    if isinstance(config.get("data"), dict):
        config["data"].setdefault("on_device", False)  # lipexp 0.3; before: in host memory
    evaluation = config.get("eval")
    if isinstance(evaluation, dict) and "lipschitz" not in evaluation:
        # what ran before lipexp 0.2: no Lipschitz analysis; its setting at 0.2's default, a
        # frozen literal (what such a run means, not today's default)
        evaluation |= {"lipschitz": False, "jacobian_iterations": 20}
    if isinstance(evaluation, dict):
        evaluation.setdefault("progress", True)  # lipexp 0.4; the numbers do not depend on it
    return config


def upgrade_results(results: dict) -> dict:
    """A results.json of any lipexp version with today's config (``upgrade_run_config``)
    and attack names, so that reports group and label old and new runs alike."""
    results = dict(results)
    if isinstance(results.get("config"), dict):
        results["config"] = upgrade_run_config(results["config"])
    if isinstance(results.get("attacks"), dict):
        results["attacks"] = {attack_name(k): v for k, v in results["attacks"].items()}
    if "clean_error" in results and isinstance(results.get("evaluation"), dict):
        # lipexp 0.2.0: the evaluated images' clean error moved into "evaluation"
        results["evaluation"] = {**results["evaluation"], "clean_error": results.pop("clean_error")}
    return results
