"""What differs between a folder's run and a command continuing it, except the settings that
may change without changing the numbers (``CHANGEABLE``, lipexp.config.identity, which also
names run folders by the others; ``CHANGEABLE``, ``flat_config`` and ``_changeable`` are
importable from here too)."""

from collections.abc import Mapping
from typing import Any

from lipexp.config.compat import PGD_SEARCH_0_3, RENAMED_KEYS, upgrade_run_config
from lipexp.config.identity import CHANGEABLE, _changeable, flat_config

__all__ = ["CHANGEABLE", "_changeable", "config_differences", "flat_config"]


def _ran(key: str, value: Any) -> bool:
    """Whether ``key`` is a setting that upgrading an old config fills in with the value
    that ran (the PGD search's settings of lipexp 0.3; fd's direction of lipexp 0.4, at the
    point), rather than today's default."""
    return (key.startswith("attacks.") and key.rpartition(".")[2] in PGD_SEARCH_0_3
            or key == "lip.direction" and value == "point")


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], older_version: bool,
                       changeable: tuple[str, ...] = CHANGEABLE) -> list[str]:
    """``["lip.lam: 0.1 -> 0.3", ...]``: the settings of ``new`` (a resolved run config) that
    differ from ``old`` (the folder's, upgraded to today's names), except ``changeable``.

    Settings that ``old`` lacks are a difference (``+trainer.accumulate_grad_batches=4``)
    unless ``older_version``: a folder of an earlier lipexp lacks the settings added since.
    Values that upgrading an old config fills in are not compared either.
    """
    raw = flat_config(old)
    renamed = {RENAMED_KEYS[k] for k in raw if k in RENAMED_KEYS}
    before = {k: v for k, v in flat_config(upgrade_run_config(dict(old))).items()
              if k in raw or k in renamed or _ran(k, v)}  # not what the upgrade filled in,
    # unless the upgrade says what ran: those settings are compared too
    after = flat_config(new)
    keys = before.keys() | (set() if older_version else after.keys())
    return [f"{k}: {before.get(k, '(absent)')!r} -> {after.get(k, '(absent)')!r}"
            for k in sorted(keys) if not _changeable(k, changeable)
            and before.get(k, "(absent)") != after.get(k, "(absent)")]
