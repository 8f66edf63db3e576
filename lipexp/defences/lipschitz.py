"""Training objectives: cross-entropy, and Lipschitz regularization of the loss (Lip1, Lip2).

Each is a plain function ``(model, x, y) -> (loss, logs)`` once Hydra has bound its
settings (``_partial_``); ``x`` is the (possibly perturbed) training batch and the model is
in train mode, as in the authors' code (batch normalization uses batch statistics).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipexp.config import Method, Scaling
from lipexp.distributed import gather_batch


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).float().mean()


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``J = mean_i CE(f(x_i), y_i)``: no penalty."""
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    return ce, {"loss": ce.detach(), "ce": ce.detach(), "acc": _accuracy(logits, y)}


def exact_grad_norms(losses: Tensor, x: Tensor, norm: int) -> Tensor:
    """``||grad_x l(x_i)||_norm`` for each i, differentiable (double backpropagation).

    ``losses`` (B,) were computed from ``x`` (B, ...) which requires grad; the gradient of
    their SUM gives each example its own gradient (plus, in train mode, the small coupling
    that batch normalization introduces between examples, as in the authors' code).
    """
    (g,) = torch.autograd.grad(losses.sum(), x, create_graph=True)
    return torch.linalg.vector_norm(g.flatten(1), ord=norm, dim=1)  # (B,)


# Method -> estimator of the per-example gradient norms; the finite-difference estimate
# of METHOD.md will be a second entry.
GRAD_NORMS: dict[Method, Callable[[Tensor, Tensor, int], Tensor]] = {
    Method.exact: exact_grad_norms,
}


def lipschitz_penalty(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: int,
    lam: float,
    lam_over_sqrt_n: bool = False,
    scaling: Scaling | str = Scaling.batch_mean,
    target: float | None = None,
    squared: bool = False,
    method: Method | str = Method.exact,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``J = mean_i l(x_i) + w * h(L)``, the study's worst-case (WCAT) penalty.

    - ``l(x) = CE(f(x), y)``; ``L = max_i ||grad_x l(x_i)||_norm`` over the WHOLE batch,
      across all data-parallel ranks (per-example units, as logged in ``grad_norm_max``).
    - ``h(L) = L``; with a ``target`` L0 the hinge ``max(0, L - L0)``; squared if ``squared``.
    - ``w = lam``, or ``lam / sqrt(n)`` with ``lam_over_sqrt_n`` (Lip1; n = C*H*W); divided by
      the global batch size B when ``scaling=batch_mean`` (as the authors' code, whose
      penalty is the gradient of the batch-MEAN loss: ``h(L) / B`` for the plain max).

    Logs the raw per-example norms (``grad_norm_max``/``grad_norm_mean``, unscaled, global).
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none")  # (B,)
    norms = gather_batch(GRAD_NORMS[Method(method)](losses, x, norm))  # (B_global,)
    largest = norms.max()
    excess = largest if target is None else (largest - target).clamp_min(0.0)
    weight = lam / math.sqrt(x[0].numel()) if lam_over_sqrt_n else lam
    if Scaling(scaling) is Scaling.batch_mean:
        weight = weight / norms.numel()
    penalty = weight * (excess.square() if squared else excess)
    ce = losses.mean()
    loss = ce + penalty
    logs = {
        "loss": loss.detach(),
        "ce": ce.detach(),
        "penalty": penalty.detach(),
        "grad_norm_max": norms.max().detach(),
        "grad_norm_mean": norms.mean().detach(),
        "acc": _accuracy(logits, y),
    }
    return loss, logs


def needs_double_backward(objective: Callable) -> bool:
    """Whether the objective (a partial of the functions above) backpropagates through a
    gradient, which PyTorch's SyncBatchNorm does not support."""
    keywords = getattr(objective, "keywords", {})
    return (getattr(objective, "func", None) is lipschitz_penalty
            and Method(keywords.get("method", Method.exact)) is Method.exact)
