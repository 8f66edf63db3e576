"""An evaluation's numbers to any Lightning logger (and, on W&B, its curves and figure)."""

from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat ``test/...`` summary numbers of an evaluation's results (errors as fractions,
    distances in the attack's norm; ``_low``/``_high``: the 95% interval's bounds):

    - the headline, the best known distance (the per-image minimum over the attacks of a
      norm, ensemble.py): ``test/<norm>_median`` (``test/l2_median``, ``test/linf_median``)
      with ``_low``/``_high``, and ``test/<norm>_error@<size key>``;
    - ``test/eval_clean_error`` (the ``eval.n_images`` evaluated images; Lightning's
      ``test/acc`` is the whole test split's) with ``_low``/``_high``;
    - each attack's own ``test/<attack>_median`` (with ``_low``/``_high``), its
      ``test/<attack>_gap`` to the headline (``median_a / median_best - 1``) and
      ``test/<attack>_optimality``, ``test/<attack>_error@<size key>``, its cost
      ``test/<attack>_seconds`` and ``test/<attack>_forward_per_image``;
    - ``test/<statistic>_max`` and ``_mean``, and with the Lipschitz analysis
      ``test/lipschitz_upper``, ``test/lipschitz_empirical``, ``test/lipschitz_ratio``,
      ``test/certified_<norm>_median``."""
    evaluation = results["evaluation"]
    out = {"test/eval_clean_error": evaluation["clean_error"]}
    out |= _bounds("test/eval_clean_error", evaluation.get("clean_error_interval"))
    for name, a in results["attacks"].items():
        if "median" in a:
            out[f"test/{name}_median"] = a["median"]
            out |= _bounds(f"test/{name}_median", a.get("median_interval"))
        out |= {f"test/{name}_error@{size}": err for size, err in a["error_at"].items()}
    for name, cost in evaluation.get("cost", {}).items():
        out |= {f"test/{name}_seconds": cost["seconds"],
                f"test/{name}_forward_per_image": cost["forward_per_image"]}
    for norm, e in results.get("ensemble", {}).items():
        out[f"test/{norm}_median"] = e["median"]
        out |= _bounds(f"test/{norm}_median", e.get("median_interval"))
        out |= {f"test/{norm}_error@{size}": err for size, err in e["error_at"].items()}
        out |= {f"test/{a}_gap": g for a, g in e.get("gap", {}).items() if g is not None}
        out |= {f"test/{a}_optimality": v for a, v in e.get("optimality", {}).items()}
    for stat, values in results["stability"].items():
        if isinstance(values, dict):  # not the "scale" note
            out |= {f"test/{stat}_{k}": v for k, v in values.items()}
    if "lipschitz" in results:
        lipschitz = results["lipschitz"]
        out["test/lipschitz_upper"] = lipschitz["upper_bound_l2"]
        out["test/lipschitz_empirical"] = lipschitz["empirical_l2"]["jacobian_max"]
        if lipschitz["ratio"] is not None:
            out["test/lipschitz_ratio"] = lipschitz["ratio"]
        out |= {f"test/certified_{norm}_median": c["median"]
                for norm, c in lipschitz["certified"].items()}
    return out


def _bounds(key: str, interval: list[float] | None) -> dict[str, float]:
    """``{key_low: ..., key_high: ...}`` of an interval (none without one)."""
    return {} if interval is None else {f"{key}_low": interval[0], f"{key}_high": interval[1]}


def headline(results: dict[str, Any]) -> str:
    """The run's final summary line: ``best known median l2 0.536 [0.512, 0.561], linf ...;
    clean error 0.021 [0.012, 0.032] (300 images)``."""
    def number(value: float, interval: list[float] | None) -> str:
        bounds = "" if interval is None else f" [{interval[0]:.4g}, {interval[1]:.4g}]"
        return f"{value:.4g}{bounds}"

    evaluation = results["evaluation"]
    medians = [f"{norm} {number(e['median'], e.get('median_interval'))}"
               for norm, e in results.get("ensemble", {}).items()]
    clean = number(evaluation["clean_error"], evaluation.get("clean_error_interval"))
    text = f"clean error {clean} ({evaluation['n_images']} images, 95% bootstrap intervals)"
    return f"best known median {', '.join(medians)}; {text}" if medians else text


def log_evaluation(logger: Logger, results: dict[str, Any]) -> None:
    """Summary numbers to any logger; on W&B also the curves as a table, the figure
    (``results["files"]["figure"]``, written first) and the numbers in the run summary."""
    numbers = metrics(results)
    logger.log_metrics(numbers)
    if isinstance(logger, WandbLogger):  # W&B's richer types have no generic Lightning API
        curves = results["attacks"] | {f"ensemble {norm}": e | {"norm": norm}
                                       for norm, e in results.get("ensemble", {}).items()}
        rows = [[name, a["norm"], eps, err] for name, a in curves.items()
                if "curve" in a for eps, err in zip(a["curve"]["eps"], a["curve"]["error"])]
        logger.log_table("test/error_curves", columns=["attack", "norm", "eps", "error"],
                         data=rows)
        logger.log_image("test/error_curves_plot", images=[results["files"]["figure"]])
        for key, value in numbers.items():
            logger.experiment.summary[key] = value
