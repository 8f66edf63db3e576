"""Figure and CSV of error curves, one curve per attack (docs/method.md, "Evaluation
protocol"), and the one drawing of an error curve that the run figure and the report share.

``curves`` maps an attack name to ``{"norm": "l2" | "linf", "curve": {"eps": [...],
"error": [...]}}`` (the curve optionally with its 95% band ``"low"``, ``"high"``; and
optionally ``"style"``, matplotlib line settings), the curve being
``summarize(...)["curve"]`` of curves.py (errors are fractions; the figures show %). Files
are written atomically (lipexp.files.atomic_path).
"""

import csv
import os

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas for png
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from lipexp.files import atomic_path

PANELS = {  # norm -> x-axis label
    "l2": "l2 perturbation size (pixels in [0, 1])",
    "linf": "l-infinity perturbation size (pixels in [0, 1])",
}


def draw_error_curve(ax: Axes, curve: dict, label: str | None = None, clean_marker: bool = True,
                     **style) -> Line2D:
    """Draw ``C(eps)`` (%) of ``curve = {"eps": [...], "error": [...]}`` on a log size axis.

    A step curve (``C`` holds its value from one grid size to the next) over the positive
    sizes; eps = 0 cannot sit on a log axis, so ``C(0)`` (the clean error of the attacked
    images) is appended to ``label`` as "(C(0) x%)" and, with ``clean_marker``, marked by a
    triangle on the axes' left edge. With the curve's 95% band (``"low"``, ``"high"``:
    intervals.curve_band) the band is shaded in the line's colour. ``style``: matplotlib
    line settings (color, ls, lw, ...).
    """
    eps = np.asarray(curve["eps"], dtype=float)
    error = 100 * np.asarray(curve["error"], dtype=float)
    clean = error[eps == 0]  # (1,), or (0,) if the curve has no eps = 0
    if label is not None and clean.size:
        label += f" (C(0) {clean[0]:.1f}%)"
    (line,) = ax.step(eps[eps > 0], error[eps > 0], where="post", label=label, **style)
    if "low" in curve and "high" in curve:
        low, high = (100 * np.asarray(curve[k], dtype=float)[eps > 0] for k in ("low", "high"))
        ax.fill_between(eps[eps > 0], low, high, step="post", color=line.get_color(),
                        alpha=0.15, lw=0, zorder=line.get_zorder() - 0.5)
    if clean_marker and clean.size:
        edge = blended_transform_factory(ax.transAxes, ax.transData)  # x: axes, y: data
        ax.plot(0, clean[0], ">", color=line.get_color(), transform=edge, clip_on=False)
    return line


def plot_error_curves(curves: dict[str, dict], path: str | os.PathLike, title: str | None = None):
    """Two panels (l2, l-infinity) of error (%) against perturbation size, log size axis, one
    curve per attack (``draw_error_curve``)."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (norm, xlabel) in zip(axes, PANELS.items()):
        attacks = {name: c["curve"] for name, c in curves.items() if c["norm"] == norm}
        styles = {name: c.get("style", {}) for name, c in curves.items()}
        for name, curve in attacks.items():
            draw_error_curve(ax, curve, name, **styles.get(name, {}))
        if attacks:
            ax.set_xscale("log")
            ax.legend(fontsize="small", loc="upper left")
        else:
            ax.text(0.5, 0.5, f"no {norm} attack", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("error (%)")
        ax.set_ylim(0, 101)  # 101: a curve at 100% stays visible above the frame
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def write_curves_csv(curves: dict[str, dict], path: str | os.PathLike) -> None:
    """Rows ``attack,norm,eps,error,error_low,error_high`` (errors as fractions; the bounds
    of the 95% band, empty for a curve without one), one per attack and size."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["attack", "norm", "eps", "error", "error_low", "error_high"])
        for name, c in curves.items():
            curve = c["curve"]
            n = len(curve["eps"])
            low, high = curve.get("low", [None] * n), curve.get("high", [None] * n)
            for eps, error, lo, hi in zip(curve["eps"], curve["error"], low, high):
                writer.writerow([name, c["norm"], repr(float(eps)), repr(float(error)),
                                 "" if lo is None else repr(float(lo)),
                                 "" if hi is None else repr(float(hi))])
