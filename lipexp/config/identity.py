"""What identifies a run: every setting of its resolved config but the ones that may change
without changing its numbers (``CHANGEABLE``), and the folder name made of them.

``run_name(config)`` is ``<defence>.<data>.<model>.seed<seed>.<hash>``, e.g.
``J2-Lip2_tanh.digits.small_cnn.seed0.1a2b3c4d``: the study's names (lipexp.config.naming)
of the run, and ``identity_hash``, 8 hex digits of the SHA-256 of everything else that
decides the numbers. Every spelling of one run (``python run.py``, ``adv=j2 lip=lip2
head=tanh``, ``defence=j2_lip2 head=tanh``, ``lip.dual_norm=2``) resolves to the same config,
hence the same name (conf/hydra/default.yaml, lipexp.config.resolvers).
"""

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from lipexp.config.naming import data_name, defence_name, model_name

# Config settings that may differ between a folder's run and a command continuing it: how
# long to train, where the logs and data live, how the progress is shown, how often
# checkpoints are written, and evaluation batch sizes (memory only). A name ending in "."
# covers its section; any other name is the setting itself and its sub-keys. Anything else
# changes the numbers.
CHANGEABLE = ("trainer.max_epochs", "recipe.epochs", "resume", "name", "mode", "ckpt_path",
              "paths.", "logger", "callbacks.", "trainer.enable_progress_bar",
              "trainer.log_every_n_steps", "trainer.enable_model_summary",
              "trainer.default_root_dir", "data.data_dir", "data.download",
              "data.num_workers", "data.eval_batch_size", "eval.batch_size", "eval.progress",
              "eval.pictures")
# Not part of the hash: Hydra's own settings (not the run's), and the seed, which the name
# states on its own so that the seeds of one run sit side by side.
NOT_HASHED = ("hydra", "seed")
HASH_DIGITS = 8  # hex digits of the SHA-256 (32 bits: a clash needs ~65000 runs in one folder)


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lip.lam": 0.1, ...}``: a nested config as dotted keys and leaf values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat |= flat_config(value, dotted)
        else:
            flat[dotted] = value
    return flat


def _changeable(key: str, changeable: tuple[str, ...]) -> bool:
    """Whether the dotted ``key`` is one of ``changeable`` or under one of them."""
    return any(key.startswith(c) if c.endswith(".") else key == c or key.startswith(c + ".")
               for c in changeable)


# Changeable when continuing a folder (resume to more epochs) but part of a run's name: a
# 40-epoch command must never be answered by a completed 1-epoch run's folder.
HASHED_LENGTH = ("trainer.max_epochs", "recipe.epochs")


def skipped(key: str) -> bool:
    """Whether the dotted ``key`` is left out of the hash: ``CHANGEABLE`` (but the training
    length, ``HASHED_LENGTH``) or ``NOT_HASHED``."""
    if _changeable(key, HASHED_LENGTH):
        return False
    return _changeable(key, CHANGEABLE + NOT_HASHED)


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a resolved run config (plain data) that decide its numbers, as dotted
    keys: all but ``skipped`` ones."""
    return {k: v for k, v in flat_config(config).items() if not skipped(k)}


def identity_hash(config: Mapping[str, Any]) -> str:
    """``HASH_DIGITS`` hex digits of the SHA-256 of ``identity(config)`` as sorted JSON (keys in
    order, so that neither the order of the config nor of the attacks matters)."""
    text = json.dumps(identity(config), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_DIGITS]


def file_safe(name: str) -> str:
    """``name`` with " & " as "_" and every character other than letters, digits, ``-`` and
    ``_`` as "_" (``J2-Lip2 & tanh`` -> ``J2-Lip2_tanh``): a folder name on any system that
    Hydra's command line reads unquoted."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name.replace(" & ", "_"))


def run_name(config: Mapping[str, Any]) -> str:
    """The folder name of a run: ``<defence>.<data>.<model>.seed<seed>.<identity_hash>``."""
    config = dict(config)
    parts = (defence_name(config), data_name(config), model_name(config),
             f"seed{config.get('seed', '?')}")
    return ".".join([*map(file_safe, parts), identity_hash(config)])
