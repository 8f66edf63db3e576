"""Hydra overrides as lipexp reads and writes them: an override's key, a value quoted so that
Hydra reads it back as given (paths can hold ``=`` or ``,``: run folders of lipexp < 0.6
were named by their overrides, e.g. ``outputs/adv=j2,head=tanh``), the command that
evaluates a run again, and the options of a list-valued group override that conf/ lacks
(``unknown_choices``). Imports nothing of lipexp: training, evaluation, the run folder and
the command line all use it.
"""

import re
import shlex
import shutil
import sys
from pathlib import Path


def override_key(override: str) -> str:
    """The key of a Hydra override, without its ``+``, ``++`` or ``~``."""
    return override.partition("=")[0].lstrip("+~")


def under(key: str, sections: tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``sections`` or one of their sub-keys."""
    return any(key == s or key.startswith(f"{s}.") for s in sections)


def hydra_quoted(value: str) -> str:
    """``value`` as a Hydra quoted string that Hydra and OmegaConf read back as exactly
    ``value``, whatever it holds (``= , [ ] ' \\ ${``...). Each layer has the same rule for
    its escape character: a run of backslashes before it is doubled, then it is escaped;
    OmegaConf's is ``${`` (an interpolation), Hydra's the closing quote (and the end)."""
    literal = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", value)
    quoted = re.sub(r"(\\*)('|\Z)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), literal)
    return f"'{quoted}'"


def reevaluate_command(target: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> str:
    """``lipexp eval /abs/target [overrides]``, shell-quoted: the command that evaluates
    ``target`` (a run folder or checkpoint) again, with the run's own evaluation settings
    and ``overrides`` (an evaluation's own, so that it repeats itself). ``lipexp`` is this
    environment's console script when the shell finds it, else ``python -m lipexp.cli`` with
    this interpreter's absolute path (``make run`` does not activate the virtual
    environment)."""
    script = shutil.which("lipexp")
    here = Path(sys.executable).parent
    command = (["lipexp"] if script and Path(script).resolve().parent == here.resolve()
               else [sys.executable, "-m", "lipexp.cli"])
    return shlex.join([*command, "eval", str(Path(target).resolve()), *overrides])


def unknown_choices(overrides: list[str], conf_dir: str | Path) -> list[str]:
    """One message per option of a list-valued group override (``attacks=[l2_pgd,bad]``)
    that ``conf_dir/<group>/`` does not have, listing the options that exist: Hydra's own
    error for a list names none ("Could not load 'attacks/bad'")."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, messages = OverridesParser.create(), []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException:  # not an override (--cfg job), or a bad one: Hydra says
            continue
        group = Path(conf_dir) / override.key_or_group
        value = override.value()
        if override.package is not None or not group.is_dir() or not isinstance(value, list):
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value:
            if str(option) not in options:
                messages.append(f"{override.key_or_group}={option}: no such option; available "
                                f"options in '{override.key_or_group}': {', '.join(options)}")
    return messages
