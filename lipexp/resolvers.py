"""OmegaConf resolvers used by conf/: run folder names and W&B run names and tags.

``${run_dir:...}`` (conf/hydra/default.yaml), ``${wandb_name:...}`` and ``${wandb_tags:...}``
(conf/logger/wandb.yaml). The names themselves come from
``lipexp.naming``, which also names runs in reports.
"""

import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from typing import Any

from omegaconf import ListConfig, OmegaConf


def run_dirname(override_dirname: str, max_len: int = 120) -> str:
    """Folder name of a run: its command-line overrides (``default`` when there are none).

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
    """The folder of ``mode=eval``: ``<run>/eval/<attack>+<attack>-<stamp>`` beside the
    evaluated checkpoint's run (``<run>/checkpoints/x.ckpt``; else the checkpoint's own
    folder), so that an evaluation never writes into the training run's files, and a new
    one never into an older one's."""
    from pathlib import Path

    if not ckpt_path:
        return "outputs/eval-without-ckpt_path"  # evaluate_checkpoint refuses it, clearly
    ckpt = Path(str(ckpt_path))
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    names = "+".join(str(k) for k in attacks) if attacks else "no-attacks"
    return str(run / "eval" / f"{names}-{stamp}")


def run_dir(mode: str, override_dirname: str, ckpt_path: str | None, attacks: Any,
            stamp: str) -> str:
    """A job's folder: ``outputs/<run_dirname>`` for training, ``eval_dirname`` for
    ``mode=eval``."""
    if getattr(mode, "value", mode) == "eval":  # the Mode enum, or its name
        return eval_dirname(ckpt_path, attacks, stamp)
    return f"outputs/{run_dirname(override_dirname)}"


def _plain(**sections: Any) -> dict:
    """Config nodes as the plain dicts that ``lipexp.naming`` reads."""
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in sections.items()}


def wandb_name(adv: Any, lip: Any, head: Any, model: Any, seed: int) -> str:
    """The W&B run name, ``J2-Lip2 & tanh / resnext34 / seed 0``."""
    from lipexp.naming import run_label

    return run_label(_plain(adv=adv, lip=lip, head=head, model=model, seed=seed))


def wandb_tags(adv: Any, lip: Any, head: Any) -> ListConfig:
    """The defence's terms as W&B tags: ``["J2", "Lip2", "tanh"]`` (a ListConfig: a resolver
    that returns a plain list cannot be resolved in place, ``--cfg job --resolve``)."""
    from lipexp.naming import defence_name

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
             "wandb_name": wandb_name, "wandb_tags": wandb_tags,
             "run_label": _deprecated("run_label", wandb_name),
             "defence_tags": _deprecated("defence_tags", wandb_tags)}


def register_resolvers() -> None:
    """Register the resolvers above with OmegaConf (idempotent)."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
