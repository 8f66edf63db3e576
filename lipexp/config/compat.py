"""Old spellings: the command-line names renamed in lipexp 0.2 (and ``+defence``, in the
defaults list since 0.6) are refused with their new spelling (``old_name_errors``, before
Hydra starts); the configs and results.json files that earlier versions wrote are read
through one chain of upgrades (``UPGRADES``), one step per version that changed them.
"""

import copy
import re
from collections.abc import Callable, Iterable
from typing import Any

from lipexp.config.overrides import override_key

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

# functions and classes renamed in lipexp 0.2: old ``_target_`` -> its name in lipexp 0.2
# (a frozen literal; the modules moved since are MOVED_MODULES')
RENAMED_TARGETS = {
    "lipexp.defences.adversarial.fgsm": "lipexp.defences.adversarial.signed_gradient_step",
    "lipexp.defences.adversarial.l2_step": "lipexp.defences.adversarial.l2_gradient_step",
    "lipexp.defences.lipschitz.lipschitz_penalty":
        "lipexp.defences.lipschitz.penalized_cross_entropy",
    "lipexp.evaluation.callback.RobustnessEvaluation": "lipexp.evaluation.runner.Evaluator",
    **{f"lipexp.evaluation.attacks.{name}": f"lipexp.evaluation.distance_attacks.{name}"
       for name in ("PGDSearch", "DeepFool", "CarliniWagner", "SquareGrid", "AutoAttack")},
}
# modules moved in lipexp 0.6 (the package's layers, docs/development.md): old module of a
# ``_target_`` -> new module, for the configs that checkpoints and results.json files hold
MOVED_MODULES = {
    "lipexp.defences.lipschitz": "lipexp.defences.penalty",
    "lipexp.evaluation.distance_attacks": "lipexp.attacks.distance",
    "lipexp.loggers": "lipexp.runs.loggers",
}


def _moved(target: str) -> str:
    """``target`` with its module as moved in lipexp 0.6 (``MOVED_MODULES``)."""
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def upgrade_target(target: str) -> str:
    """Today's ``_target_`` for one written by an earlier lipexp (renamed, then moved)."""
    return _moved(RENAMED_TARGETS.get(target, target))


CONSTANT_LR = {"_target_": "torch.optim.lr_scheduler.ConstantLR", "_partial_": True,
               "factor": 1.0, "total_iters": 0}  # conf/scheduler/none.yaml


def _options(value: Any) -> list[str]:
    """The options an override's value names: one (``adv=l2``), a list (``attacks=[a,b]``),
    or those of a sweep (``-m adv=l2,j1``, ``attacks=[a],[b]``)."""
    from hydra.core.override_parser.types import ChoiceSweep

    if isinstance(value, ChoiceSweep):
        return [option for v in value.list for option in _options(v)]
    if isinstance(value, list):
        return [option for v in value for option in _options(v)]
    return [str(value)] if isinstance(value, str | int | float) else []


def _old_names(text: str) -> list[str]:
    """The refusals of one command-line override (``old_name_errors``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    key = override_key(text)
    old_key = next((k for k in RENAMED_KEYS if key == k or key.startswith(f"{k}.")), None)
    if old_key is not None:
        return [f"{old_key} was renamed: use {RENAMED_KEYS[old_key]}"]
    section, _, rest = key.partition(".")
    if section == "attacks" and rest.partition(".")[0] in RENAMED_CHOICES["attacks"]:
        old = rest.partition(".")[0]  # attacks.fgsm.eps=...: the alias kept the old key
        return [f"attacks.{old} was renamed: use attacks.{attack_name(old)}"]
    if key not in (*RENAMED_CHOICES, "defence"):
        return []
    try:
        (override,) = OverridesParser.create().parse_overrides([text])
    except OverrideParseException:  # Hydra says what is wrong with it
        return []
    if override.package is not None or override.is_delete():
        return []
    if key == "defence":
        value = text.partition("=")[2]
        return [f"{text} was renamed: use defence={value} (no '+': defence is in the defaults "
                "list)"] if override.is_add() or override.is_force_add() else []
    renamed = RENAMED_CHOICES[key]
    old = [o for o in _options(override.value()) if o in renamed]
    if key == "attacks":
        return [f"attacks {o} was renamed: use {renamed[o]}" for o in old]
    return [f"{key}={o} was renamed: use {key}={renamed[o]}" for o in old]


def old_name_errors(overrides: Iterable[str]) -> list[str]:
    """One line per old name among command-line ``overrides`` (empty when none): the choices
    renamed in lipexp 0.2 (``adv=l2 was renamed: use adv=j2``; ``attacks fgsm was renamed:
    use linf_fgsm``, also in a list or a sweep), their keys (``lip.norm``, ``attacks.fgsm.*``),
    and ``+defence=...`` (``defence`` is in the defaults list since 0.6: ``defence=...``).
    run.py and ``lipexp eval`` refuse these before Hydra starts; options (``-m``) and text
    that is no override are ignored."""
    return [line for text in overrides if not text.startswith("-")
            for line in _old_names(text)]


def attack_name(name: str) -> str:
    """Today's name of an evaluation attack (``fgsm`` -> ``linf_fgsm``; others unchanged)."""
    return RENAMED_CHOICES["attacks"].get(name, name)


def _sections(config: dict) -> list[dict]:
    """The config's group nodes, the attacks' nodes included."""
    attacks = config.get("attacks") if isinstance(config.get("attacks"), dict) else {}
    return [s for s in [*config.values(), *attacks.values()] if isinstance(s, dict)]


def _node(mapping: dict, key: str) -> dict:
    """``mapping[key]`` if it is a dict, else a new empty dict (not stored: nothing to
    upgrade)."""
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


# Each step below turns a results.json (a dict whose "config" is the resolved run config; a
# checkpoint's config alone is ``{"config": ...}``) written before its version into one of
# that version, in place. The values a step fills in are frozen literals: what ran then,
# never today's defaults. A step only renames old spellings and fills settings that are
# absent, so a config of its version or later passes through it unchanged.


def _to_0_2(results: dict) -> None:
    """lipexp 0.2: the study's names (targets, ``lip.norm`` -> ``lip.dual_norm``, attacks
    with their norm), the constant-lr scheduler as a target, the Lipschitz analysis, and
    the evaluated images' clean error under "evaluation"."""
    config = _node(results, "config")
    for section in _sections(config):
        if isinstance(section.get("_target_"), str):
            section["_target_"] = RENAMED_TARGETS.get(section["_target_"], section["_target_"])
    lip = _node(config, "lip")
    if "norm" in lip:
        lip["dual_norm"] = lip.pop("norm")
    scheduler = config.get("scheduler")
    if isinstance(scheduler, dict) and "_target_" not in scheduler:  # old scheduler=none
        config["scheduler"] = dict(CONSTANT_LR)
    for where in (config, results):  # the attacks' configs and their results
        if isinstance(where.get("attacks"), dict):
            where["attacks"] = {attack_name(k): v for k, v in where["attacks"].items()}
    evaluation = config.get("eval")
    if isinstance(evaluation, dict) and "lipschitz" not in evaluation:
        # no Lipschitz analysis ran; its iterations at 0.2's value
        evaluation |= {"lipschitz": False, "jacobian_iterations": 20}
    if "clean_error" in results and isinstance(results.get("evaluation"), dict):
        results["evaluation"] = {**results["evaluation"], "clean_error": results.pop("clean_error")}


def _to_0_3(results: dict) -> None:
    """lipexp 0.3: the finite-difference penalty's settings (what ran before: the exact
    penalty, so fd's step and the shared passes are unused), data in host memory."""
    config = _node(results, "config")
    lip = _node(config, "lip")
    if "dual_norm" in lip:  # a penalty (lip=none has no settings)
        lip.setdefault("h", 0.01)
        lip.setdefault("reuse_adv_gradient", False)
    if isinstance(config.get("data"), dict):
        config["data"].setdefault("on_device", False)


# lipexp 0.4: the PGD search settings added, at the values that ran before (0.3's search,
# today's l2_pgd_full), for 0.3's PGD search target
PGD_SEARCH_0_3 = {"factor": 2.0, "early_stop": False, "target_order": "logit"}
PGD_SEARCH_TARGET_0_3 = "lipexp.evaluation.distance_attacks.PGDSearch"


def _to_0_4(results: dict) -> None:
    """lipexp 0.4: the cheaper PGD search (what ran before: the full protocol), progress
    bars (the numbers do not depend on them; they were shown)."""
    config = _node(results, "config")
    for attack in _node(config, "attacks").values():
        target = attack.get("_target_") if isinstance(attack, dict) else None
        if isinstance(target, str) and _moved(target) == _moved(PGD_SEARCH_TARGET_0_3):
            # (0.3's module, or today's in a config whose targets were upgraded already)
            for key, value in PGD_SEARCH_0_3.items():
                attack.setdefault(key, value)
    if isinstance(config.get("eval"), dict):
        config["eval"].setdefault("progress", True)


def _to_0_5(results: dict) -> None:
    """lipexp 0.5: where fd's direction comes from. Before, fd took it at the point (an
    estimator since changed: docs/method.md); the shared passes (reuse_adv_gradient) took
    it from the attack, and the exact method has none ("attack", unused)."""
    lip = _node(_node(results, "config"), "lip")
    if "dual_norm" in lip:
        point = lip.get("method") == "fd" and not lip.get("reuse_adv_gradient")
        lip.setdefault("direction", "point" if point else "attack")


def _to_0_6(results: dict) -> None:
    """lipexp 0.6: the package's modules moved (``MOVED_MODULES``); the ``mode`` switch
    went (an evaluation has its own task, evaluate.py: what a results.json's config held
    was always ``train``, the training run's); ``lip.batch_stats`` (before: the method's
    own, null) and ``eval.pictures`` (before: none, 0) added."""
    config = _node(results, "config")
    config.pop("mode", None)
    lip = _node(config, "lip")
    if "dual_norm" in lip:  # a penalty: its method's own statistics (exact: live, fd: fixed)
        lip.setdefault("batch_stats", None)
    if isinstance(config.get("eval"), dict):
        config["eval"].setdefault("pictures", 0)  # no pictures were drawn
    for section in _sections(config):
        if isinstance(section.get("_target_"), str):
            section["_target_"] = _moved(section["_target_"])


# (version, step): applied in this order to what an earlier version wrote, each step whose
# version is later than the one recorded
UPGRADES: tuple[tuple[str, Callable[[dict], None]], ...] = (
    ("0.2.0", _to_0_2), ("0.3.0", _to_0_3), ("0.4.0", _to_0_4), ("0.5.0", _to_0_5),
    ("0.6.0", _to_0_6))
FIRST_VERSION = "0.1.0"  # what wrote a results.json without provenance.lipexp


def version_tuple(text: Any) -> tuple[int, int, int]:
    """``(0, 4, 0)`` of "0.4.0" (also "0.4", "0.6.0.dev1"); ``FIRST_VERSION``'s of None or of
    a text that is no version ("unknown": a source tree that is not installed), so that
    every step applies: each one leaves a config of a later version as it is."""
    match = re.match(r"\d+(\.\d+)*", str(text)) if text else None
    parts = [int(p) for p in (match.group() if match else FIRST_VERSION).split(".")]
    return (*parts, 0, 0, 0)[:3]  # type: ignore[return-value]


def upgrade_results(results: dict, version: Any = None) -> dict:
    """A copy of a results.json written by lipexp ``version`` (default: the one it records,
    ``provenance.lipexp``; none: 0.1) upgraded through ``UPGRADES``, with today's config
    (targets, keys, attack names, the settings added since as they ran) and attack names,
    so that reports group and label old and new runs alike."""
    results = copy.deepcopy(dict(results))
    if version is None:
        provenance = results.get("provenance")
        version = provenance.get("lipexp") if isinstance(provenance, dict) else None
    recorded = version_tuple(version)
    for step_version, step in UPGRADES:
        if recorded < version_tuple(step_version):
            step(results)
    return results


def upgrade_run_config(config: dict, version: Any = None) -> dict:
    """A copy of a resolved run config written by lipexp ``version`` (a checkpoint's
    ``lipexp_config``, a results.json's ``config``; None: every step, which leaves what a
    later version wrote as it is) with today's targets, keys and attack names and the
    settings added since as they ran, so that it builds the same network and compares
    equal to today's configs."""
    return upgrade_results({"config": config}, version)["config"]
