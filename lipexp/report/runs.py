"""The runs of a folder: every results.json (and every Hydra job folder without one) as a
``Run``, the completed ones grouped by grid = (data, model) and defence (the study's names,
lipexp.config.naming; one row per training setting: ``group_runs``), and the config
differences between the seeds of one row."""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipexp.config.compat import upgrade_results
from lipexp.config.naming import data_name, defence_name, defence_sort_key, model_name
from lipexp.runs.build import MODEL_OPTIONS  # speed options: the same trained model
from lipexp.runs.differences import CHANGEABLE, _changeable, flat_config
from lipexp.runs.folder import RunFolder

# Config keys (prefixes) whose differences between the seeds of one defence are expected, not
# flagged: the seed; the settings that may change without changing the numbers
# (lipexp.runs.differences.CHANGEABLE: logs, paths, progress, evaluation batch sizes, ...)
# except trainer.max_epochs, which CHANGEABLE allows because a resumed run may train longer,
# but a completed run's max_epochs is how long it trained: seeds that differ in it differ in
# their numbers; and all of "recipe.": the recipe's values are compared where they are used
# (trainer.max_epochs, optimizer.lr, scheduler.milestones, ...), which a command line may
# override directly.
EXPECTED_DIFFERENCES = ("seed", "recipe.",  # matched by ``expected``
                        *(key for key in CHANGEABLE if key != "trainer.max_epochs"))


@dataclass
class Run:
    """One run folder: ``status`` is results.json's ("completed", "failed", "running", ...),
    "missing" for a Hydra job folder without results.json, "unreadable" for a broken one."""

    folder: Path
    status: str
    results: dict = field(default_factory=dict)
    message: str = ""

    @property
    def config(self) -> dict:
        config = self.results.get("config")
        return config if isinstance(config, dict) else {}


def lookup(data: Any, *path: str) -> Any:
    """``data[path[0]][path[1]]...``, or None where an entry is missing."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def find_runs(folder: Path) -> list[Run]:
    """Every results.json under ``folder``, and every Hydra job folder (one with ``.hydra``)
    that has none, sorted by folder."""
    runs = []
    for path in folder.rglob("results.json"):
        try:
            results = json.loads(path.read_text())  # Infinity / NaN are read as floats
            if not isinstance(results, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            runs.append(Run(path.parent, "unreadable", message=f"unreadable results.json: {e}"))
            continue
        results = upgrade_results(results)  # runs of earlier lipexp versions named as today
        status = str(results.get("status", "no status"))
        if status == "completed" and not isinstance(results.get("config"), dict):
            status, results["error"] = "unreadable", "completed, but results.json has no config"
        if status == "running" and RunFolder(path.parent).killed():
            again = ("run the evaluation again" if results.get("mode") == "eval" else
                     "resume=true continues it")
            status, results["error"] = "killed", f"its process is gone (killed): {again}"
        runs.append(Run(path.parent, status, results, str(results.get("error", ""))))
    for hydra in folder.rglob(".hydra"):
        if hydra.is_dir() and not (hydra.parent / "results.json").exists():
            runs.append(Run(hydra.parent, "missing", message="no results.json: the job has not "
                            "started training, or stopped before writing it"))
    return sorted(runs, key=lambda r: str(r.folder))


def _seed_key(run: Run) -> tuple:
    """Sort key of a run by seed (numbers first)."""
    seed = run.config.get("seed")
    return (0, seed) if isinstance(seed, int | float) else (1, str(seed))


def group_runs(runs: list[Run]) -> dict[tuple[str, str], dict[str, list[Run]]]:
    """Completed training runs as {(data, model): {defence: [runs by seed]}}, grids sorted
    by name, defences in the study's order. Runs of one defence that trained differently
    (``TRAINED_BY``: another ``lip.lam``, ``adv.eps``, ... as in a lambda sweep or a tuning
    study) are not seeds of one row: each setting is its own row, named by the keys that
    differ (``J2-Lip2 & tanh (lip.lam=0.3)``), by increasing value. Re-evaluations
    (evaluate.py) of a checkpoint are left out: they are not further seeds."""
    grids: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for run in runs:
        if run.status == "completed" and run.results.get("mode") != "eval":
            grid = (data_name(run.config), model_name(run.config))
            grids.setdefault(grid, {}).setdefault(defence_name(run.config), []).append(run)
    out: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for grid, defences in sorted(grids.items()):
        rows = out.setdefault(grid, {})
        for name in sorted(defences, key=defence_sort_key):
            for label, group in _by_training(name, defences[name]):
                rows[label] = sorted(group, key=_seed_key)
    return out


# Config keys (prefixes) that make a different trained model: runs of one defence differing
# in one of them (other than the expected differences) are different rows, not seeds. The
# model's speed options (lipexp.runs.build.MODEL_OPTIONS) train the same model.
TRAINED_BY = ("adv.", "lip.", "head.", "model.", "optimizer.", "scheduler.", "data.",
              "trainer.max_epochs")
SAME_MODEL = tuple(f"model.{option}" for option in MODEL_OPTIONS)


def expected(key: str) -> bool:
    """Whether seeds of one row may differ in the dotted ``key`` (``EXPECTED_DIFFERENCES``,
    matched as lipexp.config.identity matches ``CHANGEABLE``: a section, or the key itself
    and its sub-keys; ``mode`` does not cover ``model.width``)."""
    return _changeable(key, EXPECTED_DIFFERENCES)


def setting_keys(runs: list[Run]) -> list[str]:
    """The ``TRAINED_BY`` keys, held by every run, whose values differ among ``runs`` (a key
    only some runs hold, e.g. one added by a later lipexp, is left to ``config_notes``)."""
    flats = [config_values(r) for r in runs]
    common = set(flats[0]).intersection(*flats[1:]) if flats else set()
    return sorted(k for k in common if k.startswith(TRAINED_BY)
                  and not _changeable(k, SAME_MODEL) and not expected(k)
                  and len({f[k] for f in flats}) > 1)


def _shown(text: str, digits: int | None) -> str:
    """A JSON value as a row name shows it: floats to ``digits`` significant digits and
    strings unquoted; ``digits=None``: the JSON text itself (``1`` and ``"1"`` apart)."""
    if digits is None:
        return text
    value = json.loads(text)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return value if isinstance(value, str) else text


def _by_training(name: str, runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """``runs`` of the defence ``name`` split by their values of ``setting_keys``:
    ``[(row name, runs)]`` by increasing values (one row: ``name``); floats to 4 significant
    digits where that keeps the names apart."""
    keys = setting_keys(runs)
    if not keys:
        return [(name, runs)]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        flat = config_values(run)
        groups.setdefault(tuple(flat[k] for k in keys), []).append(run)

    def order(values: tuple) -> list:
        parsed = [json.loads(v) for v in values]
        return [(0, v, "") if isinstance(v, int | float) else (1, 0, str(v)) for v in parsed]

    def label(values: tuple, digits: int | None) -> str:
        return f"{name} ({', '.join(f'{k}={_shown(v, digits)}' for k, v in zip(keys, values))})"

    ordered = sorted(groups, key=order)
    digits = 4 if len({label(v, 4) for v in ordered}) == len(ordered) else None  # else exact
    return [(label(values, digits), groups[values]) for values in ordered]


def config_values(run: Run) -> dict[str, str]:
    """The run's config as {dotted key: JSON text of the value}, the run's own folder in its
    strings written "<run>" (so that seeds in different folders compare equal there). An
    empty section has no key (no leaf to compare)."""
    prefixes = [p for p in (run.results.get("output_dir"), lookup(run.config, "paths",
                                                                   "output_dir"))
                if isinstance(p, str) and p]

    def text(value: Any) -> str:
        if isinstance(value, str):
            for prefix in prefixes:
                value = value.replace(prefix, "<run>")
        return json.dumps(value)

    return {key: text(value) for key, value in flat_config(run.config).items()
            if not (isinstance(value, Mapping) and not value)}


def config_notes(runs: list[Run]) -> list[str]:
    """Warnings for one defence's runs: config keys (other than ``EXPECTED_DIFFERENCES``)
    whose values differ, and seeds that occur more than once."""
    notes = []
    flats = [config_values(r) for r in runs]
    keys = sorted(set().union(*flats))
    differing = [k for k in keys if not expected(k) and len({f.get(k) for f in flats}) > 1]
    if differing:
        notes.append("runs differ in " + ", ".join(f"`{k}`" for k in differing))
    seeds = [r.config.get("seed") for r in runs]
    repeated = sorted({str(s) for s in seeds if seeds.count(s) > 1})
    if repeated:
        notes.append("seed " + ", ".join(repeated) + " occurs more than once")
    return notes
