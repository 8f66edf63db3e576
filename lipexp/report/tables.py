"""The report's tables: a Markdown table of statistics per grid, and the CSV files (one row
per grid x defence, or per grid x defence x attack), written atomically."""

import csv
import math
from pathlib import Path

from lipexp.files import atomic_path
from lipexp.report.columns import Stat, best_rows, format_cell


def markdown_table(rows: list[dict], stats: tuple[Stat, ...]) -> list[str]:
    """A Markdown table: defence (with n when > 1), then one column per statistic, the best
    of each column in bold."""
    lines = ["| defence | " + " | ".join(s.header for s in stats) + " |",
             "|---|" + "---:|" * len(stats)]
    bold = {s.key: best_rows(rows, s) for s in stats}
    for i, row in enumerate(rows):
        name = row["defence"] + (f" (n={row['n_seeds']})" if row["n_seeds"] > 1 else "")
        cells = []
        for s in stats:
            agg = row["stats"][s.key]
            cell = format_cell(s, agg["mean"], agg["std"], agg["n"], row["n_seeds"],
                               agg.get("interval"))
            cells.append(f"**{cell}**" if i in bold[s.key] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, rows: list[dict], stats: tuple[Stat, ...]) -> None:
    """One row per grid x defence: data, model, defence, n_seeds, seeds, each statistic's
    mean, std and 95% interval ``low``/``high`` (results.json units; empty: not available;
    the interval: over the images for one seed, the t interval of the mean for several),
    folders (";"-separated)."""
    header = ["data", "model", "defence", "n_seeds", "seeds"]
    header += [f"{s.key}_{m}" for s in stats for m in ("mean", "std", "low", "high")]
    header += ["folders"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            values = []
            for s in stats:
                agg = row["stats"][s.key]
                interval = agg.get("interval") or [math.nan, math.nan]
                values += [agg["mean"], agg["std"], *interval]
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
