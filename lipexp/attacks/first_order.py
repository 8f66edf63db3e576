"""The model's linearization at an image: first-order distances to the decision boundaries.

For a wrong class ``t`` the margin ``m_t(x) = z_y(x) - z_t(x)`` is positive on a correctly
classified image; its linearization reaches zero at the distance

    d_t = m_t(x) / ||grad_x m_t(x)||_*,

``||.||_*`` the dual norm of the attack's (l1 for l-infinity, l2 for l2). For a linear model
``d_t`` is the exact distance to the half-space where ``z_t >= z_y`` (box aside), so the
class with the smallest ``d_t`` is the nearest one (DeepFool's choice). PGD uses it to
choose which classes its targeted runs aim at, and the distance search its first size
(lipexp.attacks.distance.PGDSearch).
"""

import torch
from torch import Tensor, nn

from lipexp.attacks.threat import Norm
from lipexp.model_state import eval_mode

DUAL = {Norm.l2: 2, Norm.linf: 1}  # the dual norm's order, for torch.linalg.vector_norm


def first_order_distances(model: nn.Module, x: Tensor, y: Tensor, classes: Tensor | None,
                          norm: Norm) -> Tensor:
    """``d_t`` above for each image and each class of ``classes`` (B, C), as (B, C), clamped
    to >= 0 (0 where ``z_t >= z_y`` already); ``classes`` None: the most likely wrong class
    (C = 1). One forward and C backward passes (w.r.t. the input only), in eval mode.

    Example: d = first_order_distances(model, x, y, None, Norm.l2)  # (B, 1)
    """
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        # clones: the inputs may be inference tensors (Lightning's test loop)
        x, y = x.detach().clone().requires_grad_(True), y.clone()
        classes = None if classes is None else classes.clone()
        z = model(x)  # (B, K)
        if classes is None:
            classes = z.detach().scatter(1, y[:, None], -torch.inf).argmax(1, keepdim=True)
        margin = z.gather(1, y[:, None]) - z.gather(1, classes)  # (B, C): z_y - z_t
        d = torch.empty_like(margin, dtype=x.dtype)
        for c in range(classes.shape[1]):
            (g,) = torch.autograd.grad(margin[:, c].sum(), x,
                                       retain_graph=c < classes.shape[1] - 1)
            g_norm = torch.linalg.vector_norm(g.flatten(1), ord=DUAL[norm], dim=1)
            d[:, c] = margin[:, c].detach() / g_norm.clamp_min(torch.finfo(g.dtype).tiny)
    return d.clamp_min(0)


def first_order_distance(model: nn.Module, x: Tensor, y: Tensor, norm: Norm) -> Tensor:
    """``d_k`` (B,) for ``k`` the most likely wrong class (0 where x is misclassified): the
    exact distance for a linear model whose nearest class is also its most likely wrong one.
    One forward and one backward pass. A good first size for the distance search: it saves
    the rounds spent growing from far below.

    Example: d = first_order_distance(model, x, y, Norm.linf)  # (B,) linf estimates
    """
    return first_order_distances(model, x, y, None, norm)[:, 0]
