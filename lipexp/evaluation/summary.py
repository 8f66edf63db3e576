"""An evaluation's numbers to any Lightning logger (and, on W&B, its curves and figure)."""

from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat ``test/...`` summary numbers of an evaluation's results: ``test/eval_clean_error``
    (the clean error of the ``eval.n_images`` evaluated images; Lightning's ``test/acc`` is
    the whole test split's),
    ``test/<attack>_median``, ``test/<attack>_error@<size key>``, the attack's cost
    ``test/<attack>_seconds`` and ``test/<attack>_forward_per_image``, the per-image best
    over the attacks of a norm ``test/ensemble_<norm>_median`` and ``_error@<size key>``,
    ``test/<statistic>_max``
    and ``_mean``, and with the Lipschitz analysis ``test/lipschitz_upper``,
    ``test/lipschitz_empirical``, ``test/lipschitz_ratio``, ``test/certified_<norm>_median``
    (errors as fractions, distances in the attack's norm)."""
    out = {"test/eval_clean_error": results["evaluation"]["clean_error"]}
    for name, a in results["attacks"].items():
        if "median" in a:
            out[f"test/{name}_median"] = a["median"]
        out |= {f"test/{name}_error@{size}": err for size, err in a["error_at"].items()}
    for name, cost in results["evaluation"].get("cost", {}).items():
        out |= {f"test/{name}_seconds": cost["seconds"],
                f"test/{name}_forward_per_image": cost["forward_per_image"]}
    for norm, e in results.get("ensemble", {}).items():
        out[f"test/ensemble_{norm}_median"] = e["median"]
        out |= {f"test/ensemble_{norm}_error@{size}": err for size, err in e["error_at"].items()}
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
