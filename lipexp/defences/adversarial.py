"""One-step adversarial training perturbations (docs/method.md, "Training objective").

The study's J0, J1 and J2: each is a plain function ``(model, x, y) -> x_adv`` once Hydra
has bound its size (``_partial_``). The perturbation uses the gradient of the per-example
loss at the clean image, with the model in eval mode and no random start; the parameters
get no gradient. (Not to be confused with the evaluation's l-infinity FGSM attack,
``attacks=linf_fgsm``: J1 is a signed step scaled to an l2 size.)
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipexp.model_state import eval_mode


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``g_i = grad_x l(x_i)`` with ``l = CE(model(x), y)``, for each example, in eval mode.

    Only the input is differentiated (``autograd.grad``), so the parameters' ``.grad``
    stay as they were; the result is detached.
    """
    x = x.detach().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")  # sum: each x_i gets its own grad
        (g,) = torch.autograd.grad(loss, x)
    return g


def _apply(x: Tensor, a: Tensor, clip: bool) -> Tensor:
    x_adv = x + a
    return (x_adv.clamp(0.0, 1.0) if clip else x_adv).detach()


def no_perturbation(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """J0: ``a = 0``."""
    return x


def signed_step_from_gradient(x: Tensor, g: Tensor, eps: float, clip: bool = True) -> Tensor:
    """``x + eps * sign(g) / sqrt(n)``: J1's step from the gradient ``g``."""
    return _apply(x, eps * g.sign() / math.sqrt(x[0].numel()), clip)


def l2_step_from_gradient(x: Tensor, g: Tensor, eps: float, clip: bool = True) -> Tensor:
    """``x + eps * g / ||g||_2`` (0 where ``g = 0``): J2's step from the gradient ``g``."""
    norm = g.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))  # (B,) -> (B, 1, 1, 1)
    return _apply(x, eps * g / norm.clamp_min(torch.finfo(g.dtype).tiny), clip)


def signed_gradient_step(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, clip: bool = True
) -> Tensor:
    """J1: ``x + eps * sign(g) / sqrt(n)``, the signed gradient scaled to l2 size ``eps``.

    ``n`` is the input dimension (C*H*W); where ``g`` has zeros the size is below eps.
    """
    return signed_step_from_gradient(x, input_gradient(model, x, y), eps, clip)


def l2_gradient_step(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, clip: bool = True
) -> Tensor:
    """J2: ``x + eps * g / ||g||_2``, one step of l2 gradient ascent of size ``eps``.

    An example with ``g = 0`` is left unperturbed.
    """
    return l2_step_from_gradient(x, input_gradient(model, x, y), eps, clip)


# Each gradient perturbation -> its step from the gradient, for objectives that reuse the
# perturbation's gradient (lip.method=fd takes its direction from it).
STEPS = {signed_gradient_step: signed_step_from_gradient,
         l2_gradient_step: l2_step_from_gradient}
