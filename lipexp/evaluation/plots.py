"""Figure and CSV of error curves, one curve per attack (METHOD.md "Evaluation protocol").

``curves`` maps an attack name to ``{"norm": "l2" | "linf", "curve": {"eps": [...],
"error": [...]}}``, the curve being ``summarize(...)["curve"]`` of curves.py (errors are
fractions; the figure shows %). Both files are written atomically: to a temporary file in
the same folder, then renamed over ``path``.
"""

import csv
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas for png
from matplotlib.transforms import blended_transform_factory

PANELS = {  # norm -> x-axis label
    "l2": "l2 perturbation size (pixels in [0, 1])",
    "linf": "l-infinity perturbation size (pixels in [0, 1])",
}


@contextmanager
def _atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix); rename it over ``path`` after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_error_curves(curves: dict[str, dict], path: str | os.PathLike, title: str | None = None):
    """Two panels (l2, l-infinity) of error (%) against perturbation size, log size axis.

    Each attack is a step curve (``C`` holds its value from one grid size to the next) over
    its positive sizes; eps = 0 cannot sit on a log axis, so the clean error ``C(0)`` is in
    the legend and marked by a triangle on the panel's left edge.
    """
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (norm, xlabel) in zip(axes, PANELS.items()):
        edge = blended_transform_factory(ax.transAxes, ax.transData)  # x: axes, y: data
        attacks = {name: c["curve"] for name, c in curves.items() if c["norm"] == norm}
        for name, curve in attacks.items():
            eps = np.asarray(curve["eps"], dtype=float)
            error = 100 * np.asarray(curve["error"], dtype=float)
            clean = error[eps == 0]  # (1,) or (0,) if the curve has no eps = 0
            label = f"{name} (clean {clean[0]:.1f}%)" if clean.size else name
            (line,) = ax.step(eps[eps > 0], error[eps > 0], where="post", label=label)
            if clean.size:
                ax.plot(0, clean[0], ">", color=line.get_color(), transform=edge, clip_on=False)
        if attacks:
            ax.set_xscale("log")
            ax.legend(fontsize="small", loc="upper left")
        else:
            ax.text(0.5, 0.5, f"no {norm} attack", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("error (%)")
        ax.set_ylim(0, 100)
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    with _atomic(path) as tmp:
        fig.savefig(tmp, dpi=120)


def write_curves_csv(curves: dict[str, dict], path: str | os.PathLike) -> None:
    """Rows ``attack,norm,eps,error`` (error as a fraction), one per attack and size."""
    with _atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["attack", "norm", "eps", "error"])
        for name, c in curves.items():
            for eps, error in zip(c["curve"]["eps"], c["curve"]["error"]):
                writer.writerow([name, c["norm"], repr(float(eps)), repr(float(error))])
