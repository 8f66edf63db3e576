"""The study's display names of runs, from a resolved run config (docs/method.md,
"Training objective": J2-Lip2 & tanh, ...).

``config`` is the resolved config of one run as results.json stores it (a plain dict):
``config["adv"]["_target_"]``, ``config["lip"]["_target_"]`` (and ``dual_norm``),
``config["head"]["_target_"]``, ``config["model"]``, ``config["data"]["source"]``, ``seed``.
Every function falls back to the last component of an unknown ``_target_`` and never raises
on a missing or unexpected entry: reports must show every run, whatever its config.
"""

from typing import Any

# adversarial training: the last component of adv._target_ -> name (with the function names
# of earlier lipexp versions, so that their results.json files are still named)
ADV_NAMES = {"no_perturbation": "J0", "signed_gradient_step": "J1", "l2_gradient_step": "J2",
             "fgsm": "J1", "l2_step": "J2"}
# Lipschitz term: the last component of lip._target_ -> name ("" = no term)
LIP_NAMES = {"cross_entropy": "", "penalized_cross_entropy": "Lip{norm}",
             "lipschitz_penalty": "Lip{norm}"}
# logit layer: the last component of head._target_ -> suffix of the defence name
HEAD_SUFFIXES = {"Identity": "", "TanhHead": " & tanh"}
# model: the last component of model._target_ -> name (ResNet/imagenet_resnet: see model_name)
MODEL_NAMES = {
    "ResNet": "resnet34",  # "resnext34" when cardinality > 1
    "AllCNN": "allcnn",
    "SmallCNN": "small_cnn",
    "imagenet_resnet": "imagenet_resnet{depth}",
}

# The study's order of defences in tables: each defence, then its "& tanh" variant.
STUDY_ORDER = tuple(
    f"{adv}{lip}{tanh}"
    for adv in ("J0", "J1", "J2")
    for lip in ("", "-Lip1", "-Lip2")
    for tanh in ("", " & tanh")
)


def _target(section: Any) -> str:
    """The last component of ``section["_target_"]``, or "" if there is none."""
    target = section.get("_target_") if isinstance(section, dict) else None
    return str(target).rsplit(".", 1)[-1] if target else ""


def _section(config: dict, key: str) -> dict:
    """``config[key]`` if it is a dict, else an empty dict."""
    value = config.get(key) if isinstance(config, dict) else None
    return value if isinstance(value, dict) else {}


def defence_name(config: dict) -> str:
    """"J2-Lip2 & tanh" etc.: adversarial training, Lipschitz term, then the tanh suffix."""
    adv_target = _target(_section(config, "adv"))
    adv = ADV_NAMES.get(adv_target, adv_target or "?")
    lip_section = _section(config, "lip")
    lip_target = _target(lip_section)
    dual_norm = lip_section.get("dual_norm", lip_section.get("norm", "?"))  # earlier: "norm"
    lip = (LIP_NAMES[lip_target].format(norm=dual_norm)
           if lip_target in LIP_NAMES else lip_target)
    head_target = _target(_section(config, "head"))
    suffix = HEAD_SUFFIXES.get(head_target, f" & {head_target}" if head_target else "")
    return "-".join(part for part in (adv, lip) if part) + suffix


def model_name(config: dict) -> str:
    """"resnet34", "resnext34" (ResNet with cardinality > 1), "allcnn", "small_cnn",
    "imagenet_resnet18/34", or the last component of an unknown target."""
    model = _section(config, "model")
    target = _target(model)
    if target == "ResNet" and (model.get("cardinality") or 1) > 1:
        return "resnext34"
    if target in MODEL_NAMES:
        return MODEL_NAMES[target].format(depth=model.get("depth", 18))
    return target or "?"


def data_name(config: dict) -> str:
    """The data source function's name, e.g. "cifar10" (else the data module's class)."""
    data = _section(config, "data")
    return _target(_section(data, "source")) or _target(data) or "?"


def run_label(config: dict) -> str:
    """"J2-Lip2 & tanh / resnext34 / seed 0"."""
    seed = config.get("seed", "?") if isinstance(config, dict) else "?"
    return f"{defence_name(config)} / {model_name(config)} / seed {seed}"


def defence_sort_key(name: str) -> tuple[int, str]:
    """Sort key of defence names: the study's order first, other names after, by name."""
    return (STUDY_ORDER.index(name), "") if name in STUDY_ORDER else (len(STUDY_ORDER), name)
