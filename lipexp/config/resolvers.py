"""OmegaConf resolvers used by conf/: run folder names and W&B run names and tags.

``${run_dir:...}`` and ``${sweep_subdir:...}`` (conf/hydra/default.yaml) name a training
run's folder by its resolved config (``lipexp.config.identity.run_name``), ``${wandb_name:...}``
and ``${wandb_tags:...}`` (conf/logger/wandb.yaml). The names themselves come from
``lipexp.config.naming``, which also names runs in reports.
"""

import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lipexp.config.identity import run_name, skipped


def run_dirname(override_dirname: str, max_len: int = 120) -> str:
    """Folder name of an evaluation job of a multirun (``python evaluate.py -m``, whose
    config is not the run's: conf/evaluate.yaml): its command-line overrides (``default``
    when there are none).

    Names longer than ``max_len`` (file systems stop at 255 bytes) keep their start and end
    a hash of the whole, so the same command still finds the same folder; the full list
    is in the run's .hydra/overrides.yaml.
    """
    name = override_dirname.replace("/", "_") or "default"
    if len(name) <= max_len:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{name[:max_len - 13]}~{digest}"


def eval_dirname(ckpt_path: str | None, attacks: Any, stamp: str) -> str:
    """The folder of an evaluation (evaluate.py, ``lipexp eval``):
    ``<run>/eval/<attack>+<attack>-<stamp>`` beside the evaluated checkpoint's run
    (``<run>/checkpoints/x.ckpt``; else the checkpoint's own folder), so that an evaluation
    never writes into the training run's files, and a new one never into an older one's."""
    from pathlib import Path

    if not ckpt_path:
        return "outputs/eval-without-ckpt_path"  # evaluate_checkpoint refuses it, clearly
    ckpt = Path(str(ckpt_path))
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    names = "+".join(str(k) for k in attacks) if attacks else "no-attacks"
    return str(run / "eval" / f"{names}-{stamp}")


def _identity_config(node: DictConfig, prefix: str = "") -> dict:
    """``node`` as plain data, resolved, without the keys that ``identity.skipped`` leaves out
    of a run's name: Hydra's own node (being resolved when a folder is named) and the
    ``CHANGEABLE`` settings (``paths.output_dir`` interpolates ``${hydra:...}``), which are
    never resolved here. Enums as their names, as results.json writes them."""
    plain: dict = {}
    for key in node:
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if skipped(dotted) and dotted != "seed":  # the seed is in the name, not the hash
            continue
        child = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            plain[key] = "???"
        elif (isinstance(child, DictConfig) and not child._is_none()
              and not child._is_interpolation()):
            section = _identity_config(child, dotted)
            if section or not len(child):  # a section of skipped keys only is left out, as
                plain[key] = section  # identity() leaves it out of a results.json's config
        else:
            value = node[key]
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
            plain[key] = value.name if isinstance(value, Enum) else value
    return plain


def run_dir(*, _root_: DictConfig) -> str:
    """A training run's folder, ``outputs/<run_name>`` (``_root_``: the job's whole config,
    which OmegaConf passes)."""
    return f"outputs/{run_name(_identity_config(_root_))}"


def sweep_subdir(*, _root_: DictConfig) -> str:
    """A training job's folder under ``hydra.sweep.dir``: its ``run_name``."""
    return run_name(_identity_config(_root_))


def _plain(**sections: Any) -> dict:
    """Config nodes as the plain dicts that ``lipexp.config.naming`` reads."""
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in sections.items()}


def wandb_name(adv: Any, lip: Any, head: Any, model: Any, seed: int) -> str:
    """The W&B run name, ``J2-Lip2 & tanh / resnext34 / seed 0``."""
    from lipexp.config.naming import run_label

    return run_label(_plain(adv=adv, lip=lip, head=head, model=model, seed=seed))


def wandb_tags(adv: Any, lip: Any, head: Any) -> ListConfig:
    """The defence's terms as W&B tags: ``["J2", "Lip2", "tanh"]`` (a ListConfig: a resolver
    that returns a plain list cannot be resolved in place, ``--cfg job --resolve``)."""
    from lipexp.config.naming import defence_name

    name = defence_name(_plain(adv=adv, lip=lip, head=head))
    return OmegaConf.create(name.replace(" & ", "-").split("-"))


def _deprecated(old: str, resolver: Callable) -> Callable:
    """``resolver`` under its name of lipexp 0.1, as old configs (a run's .hydra/config.yaml,
    a copied conf/logger/wandb.yaml) still write it; warns once per process."""

    @functools.wraps(resolver)
    def alias(*args: Any) -> Any:
        warnings.warn(f"the resolver ${{{old}:...}} is deprecated: use "
                      f"${{{resolver.__name__}:...}}", FutureWarning, stacklevel=2)
        return resolver(*args)

    return alias


def absolute(path: str) -> str:
    """``path`` made absolute against the working directory (symlinks kept): a run's config
    then says where its data was read, whichever folder a later ``lipexp eval`` runs in."""
    return os.path.abspath(os.path.expanduser(path))


RESOLVERS = {"absolute": absolute, "run_dirname": run_dirname, "run_dir": run_dir,
             "sweep_subdir": sweep_subdir,
             "wandb_name": wandb_name, "wandb_tags": wandb_tags,
             "run_label": _deprecated("run_label", wandb_name),
             "defence_tags": _deprecated("defence_tags", wandb_tags)}


def register_resolvers() -> None:
    """Register the resolvers above with OmegaConf (idempotent)."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
