"""Stability statistics of a model at each example (docs/method.md, "Evaluation protocol").

Notation: ``f(x)`` (K,) are the model's logits at an image ``x`` (n = C*H*W inputs),
``J = d f / d x`` (K, n) their Jacobian, ``l(x) = CE(f(x), y)`` the loss and
``g = grad_x l(x)`` (n,). ``||A||_{p,q} = max_{x != 0} ||Ax||_q / ||x||_p`` is the induced
norm. Per example:

- ``grad_loss_l2 = ||g||_2`` and ``grad_loss_l1 = ||g||_1`` (per-example norms, NOT divided
  by a batch size as the paper's batch-mean columns are);
- ``jac_2_inf = ||J||_{2,inf} = max_k ||J[k, :]||_2``, the largest l2 norm of a row;
- ``jac_1_1 = ||J||_{1,1} = max_j ||J[:, j]||_1``, the largest l1 norm of a column.

The dataset statistics are the max (and mean) of these over the test set
(``reduce_statistics``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipexp.lipschitz.model_bounds import jacobian_norms

STATISTICS = ("grad_loss_l2", "grad_loss_l1", "jac_2_inf", "jac_1_1")


def stability_statistics(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The four statistics above for each example of ``x`` (B, ...), as (B,) tensors.

    The model is in eval mode during the call (each module's mode is restored after) and
    only the input is differentiated, so the parameters' ``.grad`` are untouched.

    The Jacobian's rows and their norms come from ``lipexp.lipschitz.model_bounds.
    jacobian_norms`` (K backward passes, the rows reduced as they come), and the loss
    gradient from them by the chain rule, ``g = J^T (softmax(f) - onehot(y))``, without
    another backward pass.
    """

    def dl_df(logits: Tensor) -> Tensor:  # d l / d f = softmax(f) - onehot(y), (B, K)
        return logits.softmax(dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)

    norms = jacobian_norms(model, x, dl_df)
    g = norms.weighted  # (B, n): grad_x l
    return {
        "grad_loss_l2": torch.linalg.vector_norm(g, ord=2, dim=1),
        "grad_loss_l1": torch.linalg.vector_norm(g, ord=1, dim=1),
        "jac_2_inf": norms.row_l2,
        "jac_1_1": norms.col_l1,
    }


def reduce_statistics(per_example: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """``{name: {"max": max_i s_i, "mean": mean_i s_i}}`` over the examples (Python floats).

    Concatenate the per-batch tensors of a test set first (``torch.cat``).
    """
    return {
        name: {"max": float(s.max()), "mean": float(s.double().mean())}
        for name, s in per_example.items()
    }
