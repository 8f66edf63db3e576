"""The robustness evaluation as one callable: test images in, run-folder files and results
out (docs/method.md, "Evaluation protocol"). Hydra builds it from conf/eval/default.yaml
and conf/attacks/; the training callback (callback.py) and the evaluation task
(evaluate.py) both call it."""

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pytorch_lightning.loggers import Logger
from torch import nn

from lipexp.attacks.distance import DistanceAttack
from lipexp.attacks.threat import Norm
from lipexp.divergence import nonfinite_parameters
from lipexp.errors import require
from lipexp.evaluation.evaluate import evaluate, write_outputs
from lipexp.evaluation.gallery import log_pictures
from lipexp.evaluation.pictures import make_pictures
from lipexp.evaluation.summary import log_evaluation

log = logging.getLogger(__name__)


class Evaluator:
    """Evaluate a network on the first ``n_images`` test images (None: all) with every attack.

    ``batch_size`` images are attacked at once; ``error_at_l2`` / ``error_at_linf`` are the
    sizes (pixels in [0, 1]) whose error results.json reports for each attack of that norm;
    ``grid_points`` the sizes of each error curve; ``bf16`` attacks under bfloat16 autocast;
    ``lipschitz`` adds the Lipschitz analysis (the model's upper bound, the largest input
    Jacobian norm by ``jacobian_iterations`` power iterations per image, certified radii);
    ``progress`` shows a bar per attack; ``pictures`` images per norm are pictured with
    their adversarial examples (pictures.py; 0, the default here, none; conf/eval: 8). The
    settings' ranges are checked by the config schema (lipexp.config.schema.EvalConfig).
    """

    def __init__(self, attacks: Mapping[str, DistanceAttack], n_images: int | None = None,
                 batch_size: int = 500,
                 error_at_l2: Sequence[float] = (0.0, 0.1, 0.5, 1.5),
                 error_at_linf: Sequence[float] = (2 / 255, 8 / 255),
                 grid_points: int = 100, bf16: bool = False, lipschitz: bool = True,
                 jacobian_iterations: int = 20, progress: bool = True,
                 pictures: int = 0) -> None:
        # an attack's W&B keys are test/<name>_median, ...: a name equal to a norm's would
        # overwrite the headline test/<norm>_median (ensemble.py), certified_<norm> the radii's
        reserved = {n.value for n in Norm} | {f"certified_{n.value}" for n in Norm}
        clash = sorted(set(attacks) & reserved)
        require(not clash, f"attack name(s) {clash} are taken by the evaluation's own numbers "
                f"(test/<norm>_median is the best known distance): rename the attack (its file "
                f"in conf/attacks/, or its key in attacks)")
        self.attacks = dict(attacks)
        self.n_images, self.batch_size, self.grid_points, self.bf16, self.progress = (
            n_images, batch_size, grid_points, bf16, progress)
        self.lipschitz_iterations = jacobian_iterations if lipschitz else 0
        self.pictures = pictures
        self.error_at = {Norm.l2: tuple(error_at_l2), Norm.linf: tuple(error_at_linf)}

    def __call__(self, net: nn.Module, datamodule: Any, output_dir: str | os.PathLike,
                 logger: Logger | None = None) -> dict[str, Any] | None:
        """Evaluate ``net`` (on its device) on ``datamodule.test_set()``; write
        error_curves.csv/png and distances.npz (and the pictures: pictures.npz,
        attacks_<norm>.png) into ``output_dir`` and log the numbers to ``logger``. Returns
        the results (results.json's evaluation entries, with ``files``) on rank 0; the
        other data-parallel ranks attack their share and return None."""
        broken = nonfinite_parameters(net)
        require(not broken, f"the network has non-finite weights ({', '.join(broken[:3])}"
                f"{', ...' if len(broken) > 3 else ''}): it diverged in training and is not "
                "evaluated")
        x, y = datamodule.test_set()
        n = len(x) if self.n_images is None else min(self.n_images, len(x))
        log.info("robustness evaluation: %d images, attacks %s", n, list(self.attacks))
        evaluation = evaluate(net, x[:n], y[:n], self.attacks, error_at_sizes=self.error_at,
                              batch_size=self.batch_size, grid_points=self.grid_points,
                              bf16=self.bf16, lipschitz_iterations=self.lipschitz_iterations,
                              progress=self.progress)
        if evaluation is None:  # not rank 0
            return None
        evaluation.results["files"] = write_outputs(evaluation, output_dir)
        if self.pictures:
            files, evaluation.results["pictures"] = make_pictures(
                net, x[:n], y[:n], self.attacks, evaluation, output_dir, self.pictures,
                self.bf16)
            evaluation.results["files"] |= files
        if logger is not None:
            log_evaluation(logger, evaluation.results)
            log_pictures(logger, evaluation.results)
        return evaluation.results
