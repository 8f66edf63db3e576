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

# functions and classes renamed in lipexp 0.2: old ``_target_`` -> new ``_target_``
RENAMED_TARGETS = {
    "lipexp.defences.adversarial.fgsm": "lipexp.defences.adversarial.signed_gradient_step",
    "lipexp.defences.adversarial.l2_step": "lipexp.defences.adversarial.l2_gradient_step",
    "lipexp.defences.lipschitz.lipschitz_penalty":
        "lipexp.defences.lipschitz.penalized_cross_entropy",
    "lipexp.evaluation.callback.RobustnessEvaluation": "lipexp.evaluation.runner.Evaluator",
}
CONSTANT_LR = {"_target_": "torch.optim.lr_scheduler.ConstantLR", "_partial_": True,
               "factor": 1.0, "total_iters": 0}  # conf/scheduler/none.yaml


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


def upgrade_run_config(config: dict) -> dict:
    """A copy of a run config written by an earlier lipexp (a checkpoint's
    ``lipexp_config``), with today's targets and keys, so that it builds the same network."""
    config = copy.deepcopy(config)
    for section in config.values():
        if isinstance(section, dict) and section.get("_target_") in RENAMED_TARGETS:
            section["_target_"] = RENAMED_TARGETS[section["_target_"]]
    lip = config.get("lip")
    if isinstance(lip, dict) and "norm" in lip:  # lip.norm was renamed lip.dual_norm
        lip["dual_norm"] = lip.pop("norm")
    scheduler = config.get("scheduler")
    if isinstance(scheduler, dict) and "_target_" not in scheduler:  # old scheduler=none
        config["scheduler"] = dict(CONSTANT_LR)
    return config
