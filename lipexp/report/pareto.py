"""The report of a tuning study (``lipexp tune``, docs/tuning.md): clean test error against the
best-known median l2 distance of every completed trial, the Pareto front highlighted and
listed with its runs.

``pareto_section(folder)`` does nothing (returns ``[]``) in a folder without tune.yaml; in a
sweep folder of ``lipexp tune`` it writes ``pareto.png``, ``pareto.csv`` (every trial) and
``pareto.md`` (the front's runs), and returns the same Markdown for report.md. The front: the
runs that no other run beats in both numbers (lower or equal clean error and larger or equal
median, one of them strictly); with a ``clean_error_cap``, among the runs within the cap.
Trials that ran the same run folder (the same parameters) are one point.
"""

import csv
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global state

from lipexp.files import atomic_path
from lipexp.tune.spec import METRICS, override_value
from lipexp.tune.study import read_study

FIGURE, TABLE, LISTING = "pareto.png", "pareto.csv", "pareto.md"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """The indices of the non-dominated ``(clean error, median)`` points (error down, median
    up), by increasing clean error."""
    front = [i for i, (e, m) in enumerate(points)
             if not any(e2 <= e and m2 >= m and (e2 < e or m2 > m) for e2, m2 in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _points(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The completed trials with both numbers, one per run folder (its first trial; the
    numbers of all of them in ``trials``)."""
    by_folder: dict[str, dict[str, Any]] = {}
    for t in study["trials"]:
        if t["state"] != "COMPLETE" or t["clean_error"] is None or t["l2_median"] is None:
            continue
        key = t["run_folder"] or f"trial {t['number']}"
        if key in by_folder:
            by_folder[key]["trials"].append(t["number"])
        else:
            by_folder[key] = {**t, "trials": [t["number"]]}
    return list(by_folder.values())


def _percent(error: float) -> str:
    return f"{100 * error:.2f}%"


def _median(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.4g}"


def _draw(path: Path, study: dict[str, Any], points: list[dict], front: list[dict]) -> None:
    cap = study["clean_error_cap"]
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    finite = [p["l2_median"] for p in points if not math.isinf(p["l2_median"])]
    top = max(finite, default=1.0) * 1.15 or 1.0  # where an infinite median is drawn

    def xy(group: list[dict]) -> tuple[list[float], list[float]]:
        return ([100 * p["clean_error"] for p in group],
                [top if math.isinf(p["l2_median"]) else p["l2_median"] for p in group])

    on_front = {id(p) for p in front}
    others = [p for p in points if id(p) not in on_front]
    outside = [p for p in others if cap is not None and p["clean_error"] > cap]
    dominated = [p for p in others if p not in outside]
    if dominated:
        ax.scatter(*xy(dominated), color="0.6", label="dominated", zorder=2)
    if outside:
        ax.scatter(*xy(outside), color="0.6", marker="x", label="above the clean error cap",
                   zorder=2)
    if front:
        x, y = xy(front)
        ax.step(x, y, where="post", color="C3", lw=1, alpha=0.6, zorder=1)
        ax.scatter(x, y, color="C3", edgecolor="k", s=50, label="Pareto front", zorder=3)
        for p, xi, yi in zip(front, x, y):
            ax.annotate(f"#{p['number']}", (xi, yi), textcoords="offset points", xytext=(5, 4),
                        fontsize="small")
    if cap is not None:
        ax.axvline(100 * cap, color="k", ls="--", lw=1, label=f"cap {_percent(cap)}")
    if any(math.isinf(p["l2_median"]) for p in points):
        ax.axhline(top, color="0.8", ls=":", lw=1, label="∞ (more than half unbroken)")
    if not points:
        ax.text(0.5, 0.5, "no completed trial yet", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend(fontsize="small", loc="best")
    ax.set_xlabel(f"{METRICS['clean_error'].label} (%)")
    ax.set_ylabel(f"{METRICS['l2_median'].label} (pixels in [0, 1])")
    ax.grid(True, alpha=0.3)
    fig.suptitle(f"{study['name']}: {len(points)} runs, {len(front)} on the Pareto front")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def _params(trial: dict[str, Any], keys: list[str], digits: int | None = None) -> list[str]:
    """The trial's value of each key (``digits`` significant digits for floats; exact: as
    the run's override)."""
    values = [trial["params"].get(k, "") for k in keys]
    return [f"{v:.{digits}g}" if digits and isinstance(v, float) else
            "" if v == "" else override_value(v) for v in values]


def pareto_section(folder: str | Path) -> list[str]:
    """Write pareto.png, pareto.csv and pareto.md into a ``lipexp tune`` sweep folder; the
    Markdown section of report.md (``[]`` for any other folder)."""
    root = Path(folder)
    try:
        study = read_study(root)
    except Exception as e:  # a study that does not read is said in the report, not raised
        return ["## Tuning", "", f"The study of this folder could not be read: {e}", ""]
    if study is None:
        return []
    cap, keys = study["clean_error_cap"], study["params"]
    points = _points(study)
    feasible = [p for p in points if cap is None or p["clean_error"] <= cap]
    front = [feasible[i] for i in pareto_front([(p["clean_error"], p["l2_median"])
                                                for p in feasible])]
    _draw(root / FIGURE, study, points, front)
    front_folders = {p["run_folder"] for p in front}
    with atomic_path(root / TABLE) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", "run_folder", *keys, *METRICS, "on_front",
                         "rerun_of", "error"])
        for t in study["trials"]:
            writer.writerow([t["number"], t["state"], t["run_folder"] or "", *_params(t, keys),
                             *("" if t[m] is None else t[m] for m in METRICS),
                             t["state"] == "COMPLETE" and t["run_folder"] in front_folders,
                             "" if t["rerun_of"] is None else t["rerun_of"], t["error"] or ""])
    states: dict[str, int] = {}
    for t in study["trials"]:
        state = "lost" if t["state"] == "FAIL" and not t["counted"] else t["state"].lower()
        states[state] = states.get(state, 0) + 1
    objectives = ", ".join(f"{METRICS[o].direction} {METRICS[o].label}"
                           for o in study["objectives"])
    lines = ["## Tuning: Pareto front", "",
             f"Study `{study['name']}`: {len(study['trials'])} trials ("
             + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + f"). Objectives: "
             f"{objectives}" + (f"; clean test error at most {_percent(cap)}" if cap else "")
             + f". Tuned: {', '.join(f'`{k}`' for k in keys)}.", "",
             f"![Pareto front]({FIGURE})", "",
             "The front: the runs that no other run beats in both the clean test error (whole "
             "test split) and the best-known median l2 distance (per-image smallest "
             "adversarial l2 perturbation over the attacks, attacked images)"
             + (", among the runs within the cap" if cap else "") + f". Every trial: {TABLE}.",
             ""]
    if front:
        lines += ["| trial | run folder | " + " | ".join(f"`{k}`" for k in keys)
                  + " | clean error | best-known median l2 |",
                  "|" + " --- |" * (len(keys) + 4)]
        lines += [f"| {', '.join(f'#{n}' for n in p['trials'])} | `{p['run_folder']}` | "
                  + " | ".join(_params(p, keys, 4)) + f" | {_percent(p['clean_error'])} | "
                  f"{_median(p['l2_median'])} |" for p in front]
    else:
        lines += ["No completed trial" + (" within the cap" if cap and points else "") + " yet."]
    lines.append("")
    with atomic_path(root / LISTING) as tmp:
        tmp.write_text("\n".join([f"# lipexp tune: {study['name']}", "", *lines[2:]]) + "\n",
                       encoding="utf-8")
    return lines
