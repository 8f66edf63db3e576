"""Tables, CSVs and figures of a folder of runs (docs/method.md, "Evaluation protocol").

``report(folder)`` reads every ``results.json`` under ``folder`` (a run folder, or a Hydra
multirun folder of jobs), groups the completed runs by grid = (data, model) and, within a
grid, by defence (the study's names, lipexp.config.naming); the seeds of one defence are
aggregated as mean ± sample standard deviation (ddof = 1) and a t interval. It writes
into ``folder``, atomically:

- ``report.md``: per grid, a table of adversarial statistics (the best known distances,
  with 95% intervals), the paired ratio of each defence's median to the baseline's
  (``baseline``, default J0), one of every
  attack that the grid's runs evaluated (whatever their names in results.json) and one of
  stability statistics, one row per defence in the study's order, the best of each column
  in bold; then every run that is not in the tables (failed, unfinished, unreadable) with
  its folder;
- ``report_adversarial.csv``, ``report_stability.csv``: one row per grid x defence, each
  statistic's mean and std in results.json's units (errors as fractions; empty: not
  available);
- ``report_attacks.csv``: one row per grid x defence x attack (see ``tables.write_attacks_csv``);
- ``report_<data>_<model>_l2.png``: the l2 PGD error curves of all defences of a grid.

The parts: ``runs`` (finding and grouping the runs, config differences between seeds),
``columns`` (the statistics, their aggregation and cells), ``tables`` (Markdown and CSV),
``figure`` (the error curves); this module composes report.md from them.
"""

import re
from pathlib import Path
from typing import Any

from lipexp.config.naming import run_label
from lipexp.files import atomic_path
from lipexp.report.columns import (
    ADVERSARIAL,
    STABILITY,
    aggregate,
    attack_columns,
    best_entry,
)
from lipexp.report.figure import plot_grid
from lipexp.report.paired import BASELINE, baseline_ratios, ratio_table
from lipexp.report.pareto import pareto_section
from lipexp.report.runs import Run, config_notes, find_runs, group_runs, lookup
from lipexp.report.tables import markdown_table, write_attacks_csv, write_csv

__all__ = ["find_runs", "report"]

ATTACKS_NOTE = (
    "Every attack that the runs evaluated, by today's name: the median "
    "adversarial distance of an attack with an error curve (largest is best), and the error "
    "at its one size of a fixed-size attack such as AutoAttack (lowest is best)."
)
AGAINST_NOTE = (
    "Gap: an attack's median distance over the best known median of its norm, minus 1 "
    "(0: it found the median image's best example). Optimality (as AttackBench's): the area "
    "under the best known robust-accuracy curve over the area under the attack's, up to the "
    "largest best known distance; 1.0: the best example for every image (docs/evaluation.md)."
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


PAIRED_NOTE = (
    "Each defence's best known median l2 distance over the baseline's, on the same test "
    "images (runs of the same seed, pooled over seeds), with its 95% paired bootstrap "
    "interval (the images resampled jointly); *: the interval excludes 1, a difference the "
    "images' sampling does not explain."
)


def report(folder: str | Path, baseline: str = BASELINE) -> dict[str, Any]:
    """Write report.md, report_adversarial.csv, report_stability.csv, report_attacks.csv and
    one figure per grid into ``folder``; FileNotFoundError if ``folder`` does not exist or
    has no results.json.

    Returns ``{"folder", "files": {"markdown", "adversarial_csv", "stability_csv",
    "attacks_csv", "figures"}, "rows": [{"data", "model", "defence", "n_seeds", "seeds",
    "folders", "ratio_to_baseline": {"ratio", "interval", "differs", "n_seeds", "n_images"}
    or None, "stats": {key: {"mean", "std", "n", "interval"}}, "attacks": {attack: {"norm",
    "eps", "mean", "std", "n", "interval"}}, "notes"}], "failed": [...], "unfinished":
    [...]}``, the last two
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
             "when > 1; a cell's own n when some seeds lack the statistic), then the 95% "
             "interval: the t interval of the mean over seeds, or for one seed the bootstrap "
             "interval over the evaluated images. Headline distances are the best known: each "
             "image's smallest adversarial distance over the run's attacks of the norm. "
             "**Bold**: the best "
             "of the column (lowest error, largest median distance, lowest gradient norm; ties "
             "all bold). Clean error: the full test set. Errors at a size and medians: the "
             "attacked test images (per-image smallest adversarial perturbation; ∞: fewer than "
             "half broken; —: not evaluated).", ""]
    rows, figures = [], []
    for (data, model), defences in grids.items():
        columns = attack_columns([r for group in defences.values() for r in group])
        attack_stats = tuple(c.stat for c in columns)
        grid_rows = []
        ratios = baseline_ratios(defences, "l2", baseline)
        for name, group in defences.items():
            found = aggregate(group, attack_stats)
            grid_rows.append({
                "data": data, "model": model, "defence": name, "n_seeds": len(group),
                "ratio_to_baseline": ratios[name],
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
        against = tuple(stat for c in columns if c.eps is None for stat in c.against_best())
        found_against = {id(row): aggregate(group, against)
                         for row, group in zip(grid_rows, defences.values())}
        if any(v["n"] for agg in found_against.values() for v in agg.values()):
            every_attack += ["### Each attack against the best known distance", "",
                             *markdown_table([r | {"stats": found_against[id(r)]}
                                              for r in grid_rows], against), "",
                             AGAINST_NOTE, ""]
        figure = root / f"report_{_safe(data)}_{_safe(model)}_l2.png"
        plot_grid(figure, f"{data} / {model}", defences)
        figures.append(figure)
        n_images = sorted({n for g in defences.values() for r in g
                           if (n := lookup(best_entry(r.results, "l2"), "n_images"))})
        lines += [f"## {data} / {model}", "",
                  f"{_count(sum(map(len, defences.values())), 'run')}; attacks on "
                  f"{', '.join(map(str, n_images)) or '?'} test images.", "",
                  "### Adversarial robustness", "", *markdown_table(grid_rows, ADVERSARIAL), "",
                  *([f"### Paired comparison with {baseline}", "",
                     *ratio_table(ratios, baseline, n_seeds={k: len(v) for k, v in
                                                             defences.items()}),
                     "", PAIRED_NOTE, ""]
                    if any(r is not None for r in ratios.values()) else []),
                  f"![l2 error curves]({figure.name})", "", *every_attack,
                  "### Stability statistics", "", *markdown_table(grid_rows, STABILITY), "",
                  STABILITY_NOTE, ""]
        notes = [f"- {row['defence']}: {note}" for row in grid_rows for note in row["notes"]]
        lines += ["Notes on aggregated runs:", "", *notes, ""] if notes else []
    lines += pareto_section(root)  # a lipexp tune sweep folder: its Pareto front
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
