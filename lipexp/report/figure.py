"""The report's figure of a grid: the best known l2 error curves of all its defences (the
per-image minimum over each run's l2 attacks), the first seed's with its 95% band."""

from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global state
from matplotlib.ticker import NullFormatter

from lipexp.evaluation.plots import draw_error_curve
from lipexp.files import atomic_path
from lipexp.report.columns import best_entry
from lipexp.report.runs import Run, lookup


def plot_grid(path: Path, title: str, defences: dict[str, list[Run]]) -> None:
    """Best known l2 error (%) against size, log size axis, one colour per defence (dashed:
    & tanh); the first seed thick, with its 95% band (over the images) and its error at
    size 0 (the clean error of the attacked images) in the legend and as a triangle on the
    left edge; further seeds thin, without band."""
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    bases: list[str] = []  # row names without " & tanh": one colour each (a setting's own)
    several = False
    for name, runs in defences.items():
        base = name.replace(" & tanh", "", 1)  # J2-Lip2 & tanh (lip.lam=0.3): J2-Lip2 (...)
        bases += [base] if base not in bases else []
        style = {"color": f"C{bases.index(base) % 10}", "ls": "--" if base != name else "-"}
        curves = [c for c in (lookup(best_entry(r.results, "l2"), "curve") for r in runs) if c]
        several |= len(curves) > 1
        for i, curve in enumerate(curves):
            first = i == 0  # thick, in the legend and with its C(0) triangle
            label = name + (f" [{len(curves)} seeds]" if len(curves) > 1 else "")
            if not first:  # one band per defence: the figure stays readable
                curve = {k: v for k, v in curve.items() if k not in ("low", "high")}
            draw_error_curve(ax, curve, label if first else None, clean_marker=first,
                             lw=1.6 if first else 0.6, alpha=1.0 if first else 0.6, **style)
    if ax.lines:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no l2 curve", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("l2 perturbation size (pixels in [0, 1])")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title}: best known l2 error curves"
                 + (" (thick: first seed, thin: further seeds)" if several else ""))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
