"""Tables, CSVs and figures of a folder of runs (docs/method.md, "Evaluation protocol").

``report(folder)`` reads every ``results.json`` under ``folder`` (a run folder, or a Hydra
multirun folder of jobs), groups the completed runs by grid = (data, model) and, within a
grid, by defence (the study's names, lipexp.naming); the seeds of one defence are aggregated
as mean ± sample standard deviation (ddof = 1). It writes into ``folder``, atomically:

- ``report.md``: per grid, a table of adversarial statistics (the two PGDs), one of every
  attack that the grid's runs evaluated (whatever their names in results.json) and one of
  stability statistics, one row per defence in the study's order, the best of each column
  in bold; then every run that is not in the tables (failed, unfinished, unreadable) with
  its folder;
- ``report_adversarial.csv``, ``report_stability.csv``: one row per grid x defence, each
  statistic's mean and std in results.json's units (errors as fractions; empty: not
  available);
- ``report_attacks.csv``: one row per grid x defence x attack (see ``write_attacks_csv``);
- ``report_<data>_<model>_l2.png``: the l2 PGD error curves of all defences of a grid.
"""

import csv
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state
from matplotlib.ticker import NullFormatter

from lipexp.deprecations import upgrade_results
from lipexp.evaluation.curves import size_key
from lipexp.evaluation.plots import draw_error_curve
from lipexp.files import atomic_path
from lipexp.naming import data_name, defence_name, defence_sort_key, model_name, run_label
from lipexp.runfolder import RunFolder

L2_ATTACK, LINF_ATTACK = "l2_pgd", "linf_pgd"  # the attacks of the tables (results.json names)
# config keys whose differences between the seeds of one defence are expected (not flagged);
# "recipe.": the values that ran are compared where they are used (trainer.max_epochs,
# optimizer.lr, scheduler.milestones, ...), which a command line may override directly
EXPECTED_DIFFERENCES = ("seed", "resume", "name", "mode", "ckpt_path", "paths.", "logger.",
                        "callbacks.", "trainer.enable_progress_bar", "trainer.default_root_dir",
                        "recipe.", "eval.progress", "data.data_dir")


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


@dataclass(frozen=True)
class Stat:
    """One column: ``get(results)`` -> value or None; ``best`` is min or max; the cell shows
    ``scale * value`` with format ``spec`` (plus the value in 1/255 units if ``per255``)."""

    key: str
    header: str
    get: Callable[[dict], Any]
    best: Callable = min
    scale: float = 1.0
    spec: str = ".4g"
    per255: bool = False


def _get(data: Any, *path: str) -> Any:
    """``data[path[0]][path[1]]...``, or None where an entry is missing."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _median(attack: str) -> Callable[[dict], Any]:
    """Getter of the median distance of ``attack``: +inf where results.json has a null median
    with ``n_unbroken`` (more than half the images unbroken; strict JSON has no Infinity),
    None where the entry is missing."""

    def get(results: dict) -> Any:
        entry = _get(results, "attacks", attack)
        if isinstance(entry, dict) and entry.get("median", 0) is None and "n_unbroken" in entry:
            return math.inf
        return _get(entry, "median")

    return get


def _error_at(attack: str, size: float) -> Callable[[dict], Any]:
    """Getter of the error of ``attack`` at ``size``: from ``error_at``, else from the curve
    if ``size`` is one of its grid points (same size_key), else None."""
    key = size_key(size)

    def get(results: dict) -> Any:
        entry = _get(results, "attacks", attack) or {}
        if key in (entry.get("error_at") or {}):
            return entry["error_at"][key]
        curve = entry.get("curve") or {}
        return next((e for eps, e in zip(curve.get("eps", []), curve.get("error", []))
                     if size_key(eps) == key), None)

    return get


ADVERSARIAL = (
    Stat("clean_error", "clean error (%)", lambda r: _get(r, "clean", "error"),
         scale=100, spec=".2f"),
    Stat("l2_median", "median l2 distance", _median(L2_ATTACK), best=max),
    Stat(f"l2_error_at_{size_key(0.1)}", "error (%) at l2 0.1", _error_at(L2_ATTACK, 0.1),
         scale=100, spec=".2f"),
    Stat(f"l2_error_at_{size_key(1.5)}", "error (%) at l2 1.5", _error_at(L2_ATTACK, 1.5),
         scale=100, spec=".2f"),
    Stat("linf_median", "median l-inf distance",
         _median(LINF_ATTACK), best=max, per255=True),
    Stat(f"linf_error_at_{size_key(8 / 255)}", "error (%) at l-inf 8/255",
         _error_at(LINF_ATTACK, 8 / 255), scale=100, spec=".2f"),
)
STABILITY = (
    Stat("grad_loss_l2_max", "max ‖∇ℓ‖₂", lambda r: _get(r, "stability", "grad_loss_l2", "max")),
    Stat("jac_2_inf_max", "max ‖∇f‖₂,∞", lambda r: _get(r, "stability", "jac_2_inf", "max")),
    Stat("grad_loss_l1_max", "max ‖∇ℓ‖₁", lambda r: _get(r, "stability", "grad_loss_l1", "max")),
    Stat("jac_1_1_max", "max ‖∇f‖₁,₁", lambda r: _get(r, "stability", "jac_1_1", "max")),
    Stat("grad_loss_l2_mean", "mean ‖∇ℓ‖₂",
         lambda r: _get(r, "stability", "grad_loss_l2", "mean")),
    # the Lipschitz analysis (docs/method.md, "Lipschitz estimates"): l2, of the logits
    Stat("lipschitz_empirical", "max ‖J‖₂ (lower bound on L)",
         lambda r: _get(r, "lipschitz", "empirical_l2", "jacobian_max")),
    Stat("lipschitz_upper", "L upper bound", lambda r: _get(r, "lipschitz", "upper_bound_l2")),
    Stat("lipschitz_ratio", "upper / lower", lambda r: _get(r, "lipschitz", "ratio")),
    Stat("certified_l2_median", "median certified l2 radius",
         lambda r: _get(r, "lipschitz", "certified", "l2", "median"), best=max),
)
NORM_NAMES = {"l2": "l2", "linf": "l-inf"}  # results.json's norm -> the tables' name
ATTACKS_NOTE = (
    "Every attack that the runs evaluated, by today's name: the median "
    "adversarial distance of an attack with an error curve (largest is best), and the error "
    "at its one size of a fixed-size attack such as AutoAttack (lowest is best)."
)
STABILITY_NOTE = (
    "Stability statistics over the evaluated test images, model in eval mode: per-example "
    "norms of the input gradient of the loss ℓ and induced norms ‖·‖ₚ,q of the Jacobian of "
    "the logits f (after the tanh layer when present). The paper's loss-gradient columns "
    "(‖∇ℓ‖) are gradients of the mean loss over test batches of 100, i.e. these values / 100. "
    "Lipschitz constant L of the logits in l2: max ‖J‖₂ is the largest spectral norm of the "
    "input Jacobian over the images (a lower bound on L), the upper bound the product of the "
    "layers' operator norms; the certified radius of an image is its logit margin / (√2 L "
    "upper), a distance below which no attack can succeed."
)


def _size_text(norm: str, size: float) -> str:
    """A size as the tables write it: l-inf in 1/255 units ("8/255"), others as numbers."""
    return f"{255 * size:.4g}/255" if norm == "linf" else f"{size:.4g}"


@dataclass(frozen=True)
class AttackColumn:
    """One attack of a grid, by its name in results.json: ``eps`` None for an attack with an
    error curve (its column: the median distance), else the size of a fixed-size attack
    (its column: the error at that size)."""

    name: str
    norm: str
    eps: float | None

    @property
    def stat(self) -> Stat:
        norm = NORM_NAMES.get(self.norm, self.norm)
        if self.eps is None:
            return Stat(self.name, f"{self.name}: median {norm} distance",
                        _median(self.name), best=max,
                        per255=self.norm == "linf")
        return Stat(self.name, f"{self.name}: error (%) at {norm} "
                    f"{_size_text(self.norm, self.eps)}", _error_at(self.name, self.eps),
                    scale=100, spec=".2f")


def attack_columns(runs: list[Run]) -> tuple[AttackColumn, ...]:
    """Every attack of the runs' results.json, in order of first appearance; an attack is
    described by the first run that has it with a median or a fixed size (``eps``)."""
    columns: dict[str, AttackColumn] = {}
    for run in runs:
        for name, entry in (_get(run.results, "attacks") or {}).items():
            if name in columns or not isinstance(entry, dict):
                continue
            norm = str(entry.get("norm", "?"))
            if "median" in entry:
                columns[name] = AttackColumn(name, norm, None)
            elif isinstance(entry.get("eps"), int | float):
                columns[name] = AttackColumn(name, norm, float(entry["eps"]))
    return tuple(columns.values())


# ---------------------------------------------------------------- finding and grouping runs


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
    by name, defences in the study's order. ``mode=eval`` re-evaluations of a checkpoint
    are left out: they are not further seeds."""
    grids: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for run in runs:
        if run.status == "completed" and run.results.get("mode") != "eval":
            grid = (data_name(run.config), model_name(run.config))
            grids.setdefault(grid, {}).setdefault(defence_name(run.config), []).append(run)
    return {grid: {name: sorted(defences[name], key=_seed_key)
                   for name in sorted(defences, key=defence_sort_key)}
            for grid, defences in sorted(grids.items())}


def _flat_config(run: Run) -> dict[str, str]:
    """The run's config as {dotted key: JSON value}, the run's own folder written "<run>"."""
    prefixes = [p for p in (run.results.get("output_dir"), _get(run.config, "paths", "output_dir"))
                if isinstance(p, str) and p]
    flat: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
            return
        if isinstance(value, str):
            for prefix in prefixes:
                value = value.replace(prefix, "<run>")
        flat[key] = json.dumps(value)

    walk(run.config, "")
    return flat


def config_notes(runs: list[Run]) -> list[str]:
    """Warnings for one defence's runs: config keys (other than seed, paths, logging) whose
    values differ, and seeds that occur more than once."""
    notes = []
    flats = [_flat_config(r) for r in runs]
    keys = sorted(set().union(*flats))
    differing = [k for k in keys if not k.startswith(EXPECTED_DIFFERENCES)
                 and len({f.get(k) for f in flats}) > 1]
    if differing:
        notes.append("runs differ in " + ", ".join(f"`{k}`" for k in differing))
    seeds = [r.config.get("seed") for r in runs]
    repeated = sorted({str(s) for s in seeds if seeds.count(s) > 1})
    if repeated:
        notes.append("seed " + ", ".join(repeated) + " occurs more than once")
    return notes


# ---------------------------------------------------------------- statistics


def aggregate(runs: list[Run], stats: tuple[Stat, ...]) -> dict[str, dict[str, float]]:
    """{stat key: {"mean", "std", "n"}} over the runs that have the statistic; std is the
    sample standard deviation (NaN for fewer than 2 values or an infinite one), mean NaN when
    no run has it."""
    out = {}
    for stat in stats:
        values = [float(v) for v in (stat.get(r.results) for r in runs)
                  if isinstance(v, int | float) and not math.isnan(v)]
        finite = all(math.isfinite(v) for v in values)
        out[stat.key] = {
            "mean": float(np.mean(values)) if values else math.nan,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 and finite else math.nan,
            "n": len(values),
        }
    return out


def _shown(stat: Stat, value: float) -> float:
    """``value`` as the table shows it (rounded), to compare cells; NaN stays NaN."""
    return value if not math.isfinite(value) else float(f"{stat.scale * value:{stat.spec}}")


def format_cell(stat: Stat, mean: float, std: float, n: int = 1, n_seeds: int = 1) -> str:
    """"12.34", "12.34 ± 0.56", "∞" (infinite mean), "—" (not available); "(n=k)" when only
    k of the n_seeds runs have the statistic; the l-inf median also in 1/255 units."""
    if math.isnan(mean):
        return "—"
    if math.isinf(mean):
        text = "∞"
    else:
        text = f"{stat.scale * mean:{stat.spec}}"
        if not math.isnan(std):
            text += f" ± {stat.scale * std:{stat.spec}}"
        if stat.per255:
            text += f" ({255 * mean:.2f}/255)"
    return text + (f" (n={n})" if n < n_seeds else "")


def _bold_best(rows: list[dict], stat: Stat) -> set[int]:
    """Indices of the rows whose shown value is the best (ties: all); none for < 2 values."""
    shown = {i: _shown(stat, row["stats"][stat.key]["mean"]) for i, row in enumerate(rows)}
    shown = {i: v for i, v in shown.items() if not math.isnan(v)}
    if len(shown) < 2:
        return set()
    best = stat.best(shown.values())
    return {i for i, v in shown.items() if v == best}


# ---------------------------------------------------------------- outputs


def markdown_table(rows: list[dict], stats: tuple[Stat, ...]) -> list[str]:
    """A Markdown table: defence (with n when > 1), then one column per statistic."""
    lines = ["| defence | " + " | ".join(s.header for s in stats) + " |",
             "|---|" + "---:|" * len(stats)]
    bold = {s.key: _bold_best(rows, s) for s in stats}
    for i, row in enumerate(rows):
        name = row["defence"] + (f" (n={row['n_seeds']})" if row["n_seeds"] > 1 else "")
        cells = []
        for s in stats:
            agg = row["stats"][s.key]
            cell = format_cell(s, agg["mean"], agg["std"], agg["n"], row["n_seeds"])
            cells.append(f"**{cell}**" if i in bold[s.key] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, rows: list[dict], stats: tuple[Stat, ...]) -> None:
    """One row per grid x defence: data, model, defence, n_seeds, seeds, each statistic's
    mean and std (results.json units; empty: not available), folders (";"-separated)."""
    header = ["data", "model", "defence", "n_seeds", "seeds"]
    header += [f"{s.key}_{m}" for s in stats for m in ("mean", "std")] + ["folders"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            values = [row["stats"][s.key][m] for s in stats for m in ("mean", "std")]
            writer.writerow([row["data"], row["model"], row["defence"], row["n_seeds"],
                             " ".join(map(str, row["seeds"]))]
                            + ["" if math.isnan(v) else repr(v) for v in values]
                            + [";".join(row["folders"])])


ATTACKS_CSV = ("data", "model", "defence", "attack", "norm", "n_seeds", "median_mean",
               "median_std", "eps", "error_mean", "error_std")


def write_attacks_csv(path: Path, rows: list[dict]) -> None:
    """One row per grid x defence x attack that at least one of the defence's seeds
    evaluated: data, model, defence, attack (results.json's name), norm, n_seeds (the seeds
    that evaluated it), then for an attack with a curve its median distance's mean and std,
    for a fixed-size attack its size ``eps`` and the error's mean and std (a fraction);
    empty: not applicable or not available."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ATTACKS_CSV, restval="")
        writer.writeheader()
        for row in rows:
            for name, a in row["attacks"].items():
                if a["n"] == 0:
                    continue
                value = "median" if a["eps"] is None else "error"
                writer.writerow({
                    "data": row["data"], "model": row["model"], "defence": row["defence"],
                    "attack": name, "norm": a["norm"], "n_seeds": a["n"],
                    "eps": "" if a["eps"] is None else repr(a["eps"]),
                    **{f"{value}_{m}": "" if math.isnan(a[m]) else repr(a[m])
                       for m in ("mean", "std")},
                })


def plot_grid(path: Path, title: str, defences: dict[str, list[Run]]) -> None:
    """l2 PGD error (%) against size, log size axis, one colour per defence (dashed: & tanh);
    the first seed thick, with its error at size 0 (the clean error of the attacked images)
    in the legend and as a triangle on the left edge; further seeds thin."""
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    bases: list[str] = []  # defence names without " & tanh": one colour each
    several = False
    for name, runs in defences.items():
        base = name.removesuffix(" & tanh")
        bases += [base] if base not in bases else []
        style = {"color": f"C{bases.index(base) % 10}", "ls": "--" if base != name else "-"}
        curves = [c for c in (_get(r.results, "attacks", L2_ATTACK, "curve") for r in runs) if c]
        several |= len(curves) > 1
        for i, curve in enumerate(curves):
            first = i == 0  # thick, in the legend and with its C(0) triangle
            label = name + (f" [{len(curves)} seeds]" if len(curves) > 1 else "")
            draw_error_curve(ax, curve, label if first else None, clean_marker=first,
                             lw=1.6 if first else 0.6, alpha=1.0 if first else 0.6, **style)
    if ax.lines:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, f"no {L2_ATTACK} curve", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("l2 perturbation size (pixels in [0, 1])")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title}: {L2_ATTACK} error curves"
                 + (" (thick: first seed, thin: further seeds)" if several else ""))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def _safe(name: str) -> str:
    """``name`` usable in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _relative(folder: Path, root: Path) -> str:
    return str(folder.relative_to(root)) if folder != root else "."


def _listing(run: Run, root: Path) -> str:
    """One Markdown list item for a run that is not in the tables."""
    label = f" ({run_label(run.config)})" if run.config else ""
    message = " ".join(run.message.split())  # one line
    what = {
        "failed": f"**failed**{label}: {message}",
        "running": f"**not finished**{label}: status \"running\" (still running, or killed), "
                   f"started {run.results.get('started', '?')}",
        "missing": f"**not finished**: {message}",
        "unreadable": f"**unreadable**{label}: {message}",
    }.get(run.status, f"**status \"{run.status}\"**{label}" + (f": {message}" if message else ""))
    return f"- `{_relative(run.folder, root)}`: {what}"


def report(folder: str | Path) -> dict[str, Any]:
    """Write report.md, report_adversarial.csv, report_stability.csv, report_attacks.csv and
    one figure per grid into ``folder``; FileNotFoundError if ``folder`` does not exist or
    has no results.json.

    Returns ``{"folder", "files": {"markdown", "adversarial_csv", "stability_csv",
    "attacks_csv", "figures"}, "rows": [{"data", "model", "defence", "n_seeds", "seeds",
    "folders", "stats": {key: {"mean", "std", "n"}}, "attacks": {attack: {"norm", "eps",
    "mean", "std", "n"}}, "notes"}], "failed": [...], "unfinished": [...]}``, the last two
    as ``{"folder", "status", "message"}``; an attack's numbers are its median distance
    (``eps`` None) or its error at ``eps`` (a fixed-size attack).
    """
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    runs = find_runs(root)
    if not any(r.status != "missing" for r in runs):
        raise FileNotFoundError(f"no results.json under {folder}"
                                + (f" ({len(runs)} job folders without one)" if runs else ""))
    grids = group_runs(runs)
    completed = sum(r.status == "completed" for r in runs)
    lines = ["# lipexp report", "",
             f"Folder `{root}`: {_count(len(runs), 'run')}; {completed} completed (in the "
             f"tables), {len(runs) - completed} not (listed at the end).", "",
             "Values: mean ± sample standard deviation over seeds (n = number of seeds, shown "
             "when > 1; a cell's own n when some seeds lack the statistic). **Bold**: the best "
             "of the column (lowest error, largest median distance, lowest gradient norm; ties "
             "all bold). Clean error: the full test set. Errors at a size and medians: the "
             "attacked test images (per-image smallest adversarial perturbation; ∞: fewer than "
             "half broken; —: not evaluated).", ""]
    rows, figures = [], []
    for (data, model), defences in grids.items():
        columns = attack_columns([r for group in defences.values() for r in group])
        attack_stats = tuple(c.stat for c in columns)
        grid_rows = []
        for name, group in defences.items():
            found = aggregate(group, attack_stats)
            grid_rows.append({
                "data": data, "model": model, "defence": name, "n_seeds": len(group),
                "seeds": [r.config.get("seed") for r in group],
                "folders": [_relative(r.folder, root) for r in group],
                "stats": aggregate(group, ADVERSARIAL + STABILITY),
                "attacks": {c.name: {"norm": c.norm, "eps": c.eps, **found[c.name]}
                            for c in columns},
                "notes": config_notes(group),
            })
        rows += grid_rows
        every_attack = ["### Every attack", "",
                        *markdown_table([r | {"stats": r["attacks"]} for r in grid_rows],
                                        attack_stats), "", ATTACKS_NOTE, ""] if columns else []
        figure = root / f"report_{_safe(data)}_{_safe(model)}_l2.png"
        plot_grid(figure, f"{data} / {model}", defences)
        figures.append(figure)
        n_images = sorted({n for g in defences.values() for r in g
                           if (n := _get(r.results, "attacks", L2_ATTACK, "n_images"))})
        lines += [f"## {data} / {model}", "",
                  f"{_count(sum(map(len, defences.values())), 'run')}; attacks on "
                  f"{', '.join(map(str, n_images)) or '?'} test images.", "",
                  "### Adversarial robustness", "", *markdown_table(grid_rows, ADVERSARIAL), "",
                  f"![l2 error curves]({figure.name})", "", *every_attack,
                  "### Stability statistics", "", *markdown_table(grid_rows, STABILITY), "",
                  STABILITY_NOTE, ""]
        notes = [f"- {row['defence']}: {note}" for row in grid_rows for note in row["notes"]]
        lines += ["Notes on aggregated runs:", "", *notes, ""] if notes else []
    others = [r for r in runs if r.status != "completed"]
    lines += ["## Runs not in the tables", ""]
    lines += [_listing(r, root) for r in others] or ["None: every run completed."]
    paths = {"markdown": root / "report.md", "adversarial_csv": root / "report_adversarial.csv",
             "stability_csv": root / "report_stability.csv",
             "attacks_csv": root / "report_attacks.csv"}
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_csv(paths["adversarial_csv"], rows, ADVERSARIAL)
    write_csv(paths["stability_csv"], rows, STABILITY)
    write_attacks_csv(paths["attacks_csv"], rows)

    def entry(r: Run) -> dict:
        return {"folder": _relative(r.folder, root), "status": r.status, "message": r.message}

    return {
        "folder": str(root),
        "files": {**{k: str(p) for k, p in paths.items()}, "figures": list(map(str, figures))},
        "rows": rows,
        "failed": [entry(r) for r in others if r.status in ("failed", "unreadable")],
        "unfinished": [entry(r) for r in others if r.status not in ("failed", "unreadable")],
    }
