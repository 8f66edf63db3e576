"""What an input-gradient-norm estimator of the penalty returns (lipexp.defences.penalty's
ESTIMATORS: exact double backpropagation, the finite difference of finite_difference.py)."""

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class GradNorms:
    """What an estimator returns for a batch of B examples and K classes."""

    losses: Tensor  # (B,) l(x_i) = CE(f(x_i), y_i), differentiable w.r.t. the parameters
    logits: Tensor  # (B, K) f(x_i)
    # (B,) ||grad_x l(x_i)||_dual_norm, differentiable w.r.t. the parameters at least at
    # its largest entry, the one the penalty's max uses (fd: only there)
    norms: Tensor


# (model, x, y, dual_norm, h) -> GradNorms; h is the finite-difference step (l2, pixels),
# which the exact estimator ignores.
GradNormEstimator = Callable[[nn.Module, Tensor, Tensor, int, float], GradNorms]
