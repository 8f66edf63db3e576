"""The public names for notebooks: ``lipexp.load_run`` and ``lipexp.evaluate`` (docs/api.md).

``load_run(path)`` gives a trained run's network (eval mode), its config, its results and
the per-image adversarial distances its evaluation saved, and its own test images;
``evaluate(model, x, y)`` runs lipexp's evaluation attacks, with the settings of conf/attacks/
and conf/eval/, on any network and images. Distances are in the attack's norm (l2 or
l-infinity) of pixels in [0, 1].

Internal modules may move; these names stay.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lipexp.config.compat import attack_name, upgrade_results
from lipexp.errors import require
from lipexp.model_state import eval_mode, frozen_parameters
from lipexp.runs.checkpoint import RunCheckpoint, load_run_checkpoint, load_weights
from lipexp.runs.folder import RunFolder, RunFolderError, read_results

DISTANCES = "distances.npz"  # lipexp.evaluation.evaluate.write_outputs, in the run folder
# distances.npz arrays that are not adversarial distances: the test-set index of each
# evaluated image, and the certified radii (lower bounds, not found examples)
NOT_DISTANCES = ("indices", "certified_l2", "certified_linf")
# eval settings that ``evaluate`` does not take: the images are given, and it writes no
# files (pictures)
NOT_SETTINGS = ("_target_", "n_images", "pictures")


@dataclass(frozen=True, eq=False)
class Run:
    """A trained run, read back (``load_run``).

    - ``model``: the network (``module.net``: the model and its head, logits out), in eval
      mode, on the device given to ``load_run``;
    - ``config``: the resolved run config (a plain dict, today's names);
    - ``results``: results.json (today's names; None when the folder has none, or when the
      checkpoint loaded is not the one its evaluation used); a null median there is +inf
      (more than half the images unbroken: strict JSON has no infinity);
    - ``distances``: ``{attack: (n,) float32 array}`` of the evaluation's per-image
      adversarial distances (distances.npz), one per attack and ``ensemble_l2`` /
      ``ensemble_linf`` (the per-image minimum over the attacks of that norm); 0 for an
      image misclassified clean, +inf for one never broken; empty when none were saved;
    - ``certified``: ``{"certified_l2" | "certified_linf": (n,) array}`` of certified
      radii (lower bounds on the distances, docs/method.md, "Guarantees"); empty without
      the Lipschitz analysis;
    - ``indices``: (n,) test-set index of each evaluated image (None without distances);
    - ``path``: the run folder; ``checkpoint``: the checkpoint file the weights come from.
    """

    model: nn.Module = field(repr=False)
    config: dict[str, Any] = field(repr=False)
    results: dict[str, Any] | None = field(repr=False)
    distances: dict[str, np.ndarray] = field(repr=False)
    certified: dict[str, np.ndarray] = field(repr=False)
    indices: np.ndarray | None = field(repr=False)
    path: Path
    checkpoint: Path

    def test_images(self, n: int | None = None,
                    data_dir: str | Path | None = None) -> tuple[Tensor, Tensor]:
        """``(x, y)``: the run's test images (float32 in [0, 1], (N, C, H, W)) and labels
        (int64), on the model's device, from the run's data config.

        ``n=None``: the images the evaluation attacked (distances.npz's ``indices``, else
        the first ``eval.n_images`` test images, as lipexp.evaluation.runner.Evaluator takes
        them), in the order of ``distances``; ``n``: the first ``n`` test images.
        ``data_dir``: where the data set is, when the run's own ``data.data_dir`` is not
        on this machine (a run trained elsewhere)."""
        from omegaconf import OmegaConf

        from lipexp.data.datamodule import to_unit
        from lipexp.runs.build import build_datamodule

        require(n is None or n > 0, f"n must be > 0 or None (the evaluated images), got {n}")
        cfg = OmegaConf.create(self.config)
        cfg.data.on_device = False  # the training split is not read
        if data_dir is not None:
            cfg.data.data_dir = str(data_dir)
        data = build_datamodule(cfg)
        data.setup("test")
        x, y = data.test_set()
        if n is None and self.indices is not None:
            index = torch.as_tensor(self.indices, dtype=torch.int64)
            x, y = x[index], y[index]
        else:
            n = n if n is not None else (self.config.get("eval") or {}).get("n_images")
            x, y = (x, y) if n is None else (x[:n], y[:n])
        device = _device_of(self.model)
        return to_unit(x.to(device)), y.to(device)


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """The run at ``path``: a run folder (its final weights: a completed run's
    checkpoints/last.ckpt, else the newest readable checkpoint) or a checkpoint file.

    Results and distances are those of the folder (``<run>/checkpoints/x.ckpt`` belongs to
    ``<run>``) when the checkpoint is the one ``load_run(folder)`` loads: an older one's
    weights are not what the evaluation measured. FileNotFoundError for a missing path;
    RunFolderError for a folder without a readable checkpoint; CheckpointError for a file
    that is not a lipexp checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint file")
    if path.is_dir():
        folder = path
        checkpoint = RunFolder(folder).final_checkpoint(load_run_checkpoint)
        evaluated = True
    else:
        checkpoint = load_run_checkpoint(path)
        folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        evaluated = _evaluated_checkpoint(folder) == checkpoint.path
    results = read_results(folder / "results.json") if evaluated else None
    distances, certified, indices = _read_distances(folder / DISTANCES) if evaluated else (
        {}, {}, None)
    return Run(model=_network(checkpoint, device),
               config=checkpoint.config,
               results=upgrade_results(results) if results else None,
               distances=distances, certified=certified, indices=indices,
               path=folder.resolve(), checkpoint=checkpoint.path)


def _evaluated_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``load_run(folder)`` loads (not read; None without one)."""
    if not (folder / "results.json").is_file():
        return None
    try:
        return RunFolder(folder).final_checkpoint(Path).resolve()
    except RunFolderError:
        return None


def _network(checkpoint: RunCheckpoint, device: str | torch.device) -> nn.Module:
    """``module.net`` of the checkpoint's config with its weights, in eval mode on ``device``;
    the caller's random state is left as it was (building draws the initial weights)."""
    from omegaconf import OmegaConf

    from lipexp.runs.build import build_module

    with torch.random.fork_rng(devices=[]):
        module = build_module(OmegaConf.create(checkpoint.config), training=False)
    load_weights(module, checkpoint)
    return module.net.to(device).eval()


def _read_distances(path: Path) -> tuple[dict, dict, np.ndarray | None]:
    """``(distances, certified radii, indices)`` of a distances.npz (empty when absent),
    attacks under today's names."""
    if not path.is_file():
        return {}, {}, None
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    distances = {attack_name(k): v for k, v in arrays.items() if k not in NOT_DISTANCES}
    certified = {k: v for k, v in arrays.items() if k.startswith("certified_")}
    return distances, certified, arrays.get("indices")


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    require(parameter is not None, "the model has no parameters: lipexp's attacks take the "
            "device from them")
    return parameter.device


@dataclass(frozen=True, eq=False)
class Robustness:
    """What ``evaluate`` measured.

    - ``distances``: ``{attack: (N,) float32 array}`` per-image adversarial distances in the
      attack's norm (pixels in [0, 1]): the norm of the smallest misclassified example the
      attack found (an upper bound on the true distance), 0 for an image misclassified
      clean, +inf when never broken; and ``ensemble_l2`` / ``ensemble_linf``, the per-image
      minimum over the attacks of that norm;
    - ``medians``: ``{attack: lower median}`` of those distances (``d_(ceil(N/2))`` of the
      sorted ones, +inf when more than half are unbroken), for the attacks that search a
      size (not a fixed-size check such as linf_autoattack);
    - ``clean_error``: the fraction of the N images misclassified clean;
    - ``results``: everything else, as results.json holds an evaluation (error curves,
      error at the sizes of ``error_at_l2``/``error_at_linf``, stability statistics,
      the gradient-masking checks, each attack's settings and cost).
    """

    distances: dict[str, np.ndarray] = field(repr=False)
    medians: dict[str, float]
    clean_error: float
    results: dict[str, Any] = field(repr=False)


def evaluate(model: nn.Module, x: Tensor, y: Tensor,
             attacks: Iterable[str] | str = ("l2_pgd", "linf_pgd"),
             device: str | torch.device | None = None, **settings: Any) -> Robustness:
    """lipexp's robustness evaluation of any network ``model`` (logits out) on images ``x``
    (N, C, H, W; float in [0, 1], or uint8) with labels ``y`` (N,).

    ``attacks``: names of conf/attacks/ (``l2_pgd``, ``linf_pgd``, ``l2_deepfool``, ...), each
    built from its file by Hydra with the project's settings. ``settings``: a keyword naming
    one of ``attacks`` takes a dict of that attack's settings (``l2_pgd={"rtol": 0.01}``);
    any other keyword is a setting of conf/eval/default.yaml (``batch_size``, ``bf16``,
    ``error_at_l2``, ``progress``, ...). One default differs from conf/eval:
    ``lipschitz=False`` (the Lipschitz analysis needs a rule for every layer,
    lipexp/lipschitz/model_bounds.py; pass ``lipschitz=True`` for lipexp's networks).

    ``device``: where to attack (None: the model's device); the model is moved there for
    the call and back after. The model is in eval mode with frozen parameters during the
    call; each module's mode, the parameters' flags and gradients are restored after."""
    from lipexp.evaluation.evaluate import evaluate as evaluate_images

    names = [attacks] if isinstance(attacks, str) else list(attacks)
    evaluator = _evaluator(names, settings)
    require(x.ndim >= 2 and len(x) == len(y) > 0,
            f"x (N, C, H, W) and y (N,) must hold the same N > 0 images, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != torch.uint8:
        require(bool(x.min() >= 0) and bool(x.max() <= 1),
                f"pixels must be in [0, 1] (the attacks' box and their sizes' units), got "
                f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")
    home = _device_of(model)
    try:
        if device is not None:
            model.to(device)
        with eval_mode(model), frozen_parameters(model):
            evaluation = evaluate_images(
                model, x, y.long(), evaluator.attacks, error_at_sizes=evaluator.error_at,
                batch_size=evaluator.batch_size, grid_points=evaluator.grid_points,
                bf16=evaluator.bf16, lipschitz_iterations=evaluator.lipschitz_iterations,
                progress=evaluator.progress)
    finally:
        if device is not None:
            model.to(home)
    results = evaluation.results
    medians = {name: entry["median"] for name, entry in results["attacks"].items()
               if "median" in entry}
    medians |= {f"ensemble_{norm}": entry["median"]
                for norm, entry in results["ensemble"].items()}
    return Robustness(distances=evaluation.distances, medians=medians,
                      clean_error=results["evaluation"]["clean_error"], results=results)


def _evaluator(names: list[str], settings: Mapping[str, Any]):
    """lipexp.evaluation.runner.Evaluator of conf/eval/default.yaml and the attacks
    ``names`` of conf/attacks/, composed by Hydra, with ``settings`` merged in (see
    ``evaluate``); ValueError for an unknown attack or setting, or one out of range."""
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    from lipexp.config.root import CONF, compose
    from lipexp.runs.build import build_evaluator

    available = sorted(p.stem for p in (CONF / "attacks").glob("*.yaml"))
    require(len(names) > 0, f"give at least one attack, of: {', '.join(available)}")
    unknown = [n for n in names if not re.fullmatch(r"\w+", str(n)) or n not in available]
    require(not unknown, f"no such attack {', '.join(map(str, unknown))}; conf/attacks/ has: "
            f"{', '.join(available)}")
    require(len(set(names)) == len(names), f"an attack named twice: {names}")
    cfg = compose("config", [f"attacks=[{','.join(names)}]"])
    settings = {"lipschitz": False, **settings}
    for key, value in settings.items():
        if key in cfg.attacks:  # the attack's own settings (its node of conf/attacks/)
            require(isinstance(value, Mapping), f"{key}: give the attack's settings as a dict, "
                    f"e.g. {key}={{'rtol': 0.01}}")
            known = [k for k in cfg.attacks[key] if k != "_target_"]
            extra = sorted(set(value) - set(known))
            require(not extra, f"{key} has no setting {', '.join(extra)}; its settings: "
                    f"{', '.join(known)}")
            for setting, v in value.items():
                cfg.attacks[key][setting] = v
        else:
            known = [k for k in cfg.eval if k not in NOT_SETTINGS]
            require(key in known, f"{key}: neither one of the attacks ({', '.join(names)}) "
                    f"nor an evaluation setting ({', '.join(known)}; the images are given, "
                    "so there is no n_images)")
            cfg.eval[key] = value  # the schema (EvalConfig) checks its type
    OmegaConf.to_object(cfg.eval)  # the schema's range checks (EvalConfig)
    try:
        return build_evaluator(cfg)  # each attack's own checks
    except InstantiationException as e:  # Hydra's wrapping of the constructor's ValueError
        raise ValueError(" ".join(str(e).split())) from e
