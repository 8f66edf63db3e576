"""The training step's objective when the fd penalty meets an attack (docs/method.md,
"Finite-difference estimate of the gradient norm"): ``compose`` turns the run's
``(perturb, objective)`` partials into what the step runs, and holds the two objectives that
share the attack's passes (``attack_fd_objective``, ``adversarial_fd_objective``) and the
refusals of settings that cannot share them. Above both the estimator
(``lipexp.defences.fd``) and the penalty (``lipexp.defences.penalty``), so
neither imports the other's callers.
"""

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from lipexp.config.schema import Direction, Method
from lipexp.defences.adversarial import (
    STEPS,
    input_gradient,
    l2_gradient_step,
    no_perturbation,
    signed_gradient_step,
)
from lipexp.defences.batch_stats import running_stats_kept
from lipexp.defences.fd import (
    clean_loss_and_direction,
    fd_grad_norms,
    loss_at,
    quotient_to_norm,
    step_lengths,
    unit_direction,
)
from lipexp.defences.grad_norms import GradNorms
from lipexp.defences.penalty import penalized, penalized_cross_entropy


def adversarial_fd_objective(model: nn.Module, x: Tensor, y: Tensor, eps: float, clip: bool,
                             **penalty: object) -> tuple[Tensor, dict[str, Tensor]]:
    """J1-Lip1 / J2-Lip2 with the fd penalty sharing the adversarial step's passes
    (``lip.reuse_adv_gradient=true``; ``x`` is the CLEAN batch, the model in train mode).

    ``d`` from the train-mode gradient at ``x`` (J2: ``g / ||g||_2`` with dual_norm 2; J1:
    ``sign(g) / sqrt(n)`` with dual_norm 1), ``x_adv = x + eps d`` (clipped to [0, 1] if
    ``clip``), then ``J = mean_i l(x_adv_i) + w h(max_i N_i)`` with
    ``N_i = sqrt(n)^[dual_norm == 1] (l(x_adv_i) - l(x_i)) / s_i``, ``s_i`` the step taken
    (``step_lengths``; ``eps`` unclipped, ``N_i = 0`` for no step) and ``w h(.)`` the
    penalty of ``penalized_cross_entropy`` (its keyword settings in ``penalty``).
    Two forward passes.
    """

    dual_norm = int(penalty["dual_norm"])
    with running_stats_kept(model):  # batch norm counts the adversarial batch only
        losses, _, d = clean_loss_and_direction(model, x, y, dual_norm)
    x_adv = x.detach() + eps * d
    x_adv = (x_adv.clamp(0.0, 1.0) if clip else x_adv).detach()
    losses_adv, logits_adv = loss_at(model, x_adv, y)
    steps = step_lengths(x_adv - x.detach(), dual_norm)  # (B,): eps unless clipped
    norms = quotient_to_norm(losses, losses_adv, steps.clamp_min(torch.finfo(steps.dtype).tiny),
                             dual_norm, x[0].numel())
    norms = torch.where(steps > 0, norms, torch.zeros_like(norms))  # no step, no slope
    return penalized(GradNorms(losses_adv, logits_adv, norms), y, n=x[0].numel(), **penalty)


def attack_fd_objective(model: nn.Module, x: Tensor, y: Tensor, step: Callable, eps: float,
                        clip: bool, h: float,
                        **penalty: object) -> tuple[Tensor, dict[str, Tensor]]:
    """J1/J2 with the fd penalty along the attack's own direction (``lip.direction=attack``,
    the default; ``x`` is the CLEAN batch).

    ``g`` is the perturbation's gradient (eval mode, at ``x``), ``x_adv = step(x, g)`` and
    ``J = mean_i l(x_adv_i) + w h(max_i N_i)`` with ``N_i`` the estimate of ``fd_grad_norms``
    at ``x_adv`` along ``d = unit_direction(g)``: the attack's backward pass is the only one
    to the input, so fd costs one forward pass without a graph (and one image) more than J2.
    ``N_i`` is the slope along the gradient's direction at the clean image, a lower bound of
    ``||grad l(x_adv_i)||`` to first order in ``h`` (docs/method.md says by how much).
    """

    g = input_gradient(model, x, y)
    dual_norm = int(penalty["dual_norm"])
    est = fd_grad_norms(model, step(x, g, eps, clip), y, dual_norm, h,
                        direction=unit_direction(g, dual_norm))
    return penalized(est, y, n=x[0].numel(), **penalty)


def _penalty_settings(objective: Callable) -> tuple[dict, float, object]:
    """``(settings of penalized, h, direction)`` from a ``penalized_cross_entropy`` partial's
    keywords: the fd-only keys taken out."""

    settings = dict(objective.keywords)
    for key in ("method", "reuse_adv_gradient"):
        settings.pop(key, None)
    return (settings, settings.pop("h", 0.01),
            Direction(settings.pop("direction", Direction.attack)))


def compose(perturb: Callable, objective: Callable) -> tuple[Callable, Callable]:
    """``(perturb, objective)`` as the training step runs them (partials as Hydra builds
    them). The fd penalty with J1/J2 uses the attack's gradient: ``lip.reuse_adv_gradient``
    shares its passes (``share_adversarial_passes``), ``lip.direction=attack`` its direction
    (``attack_fd_objective``); both then take the clean batch (``perturb`` passes it
    through). Anything else is returned as it is."""

    keywords = getattr(objective, "keywords", {})
    if (getattr(objective, "func", None) is not penalized_cross_entropy
            or Method(keywords.get("method", Method.exact)) is not Method.fd):
        return perturb, objective
    if keywords.get("reuse_adv_gradient"):
        return share_adversarial_passes(perturb, objective)
    settings, h, direction = _penalty_settings(objective)
    step = STEPS.get(getattr(perturb, "func", perturb))
    if step is None or direction is Direction.point:
        return perturb, objective  # J0, or d at the point: the estimator alone
    eps, clip = perturb.keywords["eps"], perturb.keywords.get("clip", True)
    return no_perturbation, partial(attack_fd_objective, step=step, eps=eps, clip=clip, h=h,
                                    **settings)


def share_adversarial_passes(perturb: Callable, objective: Callable) -> tuple[Callable, Callable]:
    """``(perturb, objective)`` of a run with ``lip.reuse_adv_gradient=true`` (partials as Hydra
    builds them): the clean batch passes through and ``adversarial_fd_objective`` makes the
    J1/J2 step and the penalty. Refuses what it cannot share: no attack step (J0), an
    attack whose direction is not the penalty's (J2 pairs with Lip2, J1 with Lip1), or
    ``lip.h`` different from ``adv.eps`` (the adversarial image must be ``x + h d``)."""

    settings, h, direction = _penalty_settings(objective)
    if direction is Direction.point:
        raise ValueError("lip.reuse_adv_gradient=true takes the direction from the attack's "
                         "train-mode gradient; it cannot be combined with lip.direction=point")
    pairs = {l2_gradient_step: (2, "adv=j2 with lip=lip2"),
             signed_gradient_step: (1, "adv=j1 with lip=lip1")}
    func = getattr(perturb, "func", perturb)
    if func not in pairs or pairs[func][0] != settings["dual_norm"]:
        raise ValueError("lip.reuse_adv_gradient=true shares the attack's direction with the "
                         "penalty's: use adv=j2 with lip.dual_norm=2 or adv=j1 with "
                         f"lip.dual_norm=1 (got {getattr(func, '__name__', func)} and "
                         f"dual_norm={settings['dual_norm']})")
    eps, clip = perturb.keywords["eps"], perturb.keywords.get("clip", True)
    if not math.isclose(h, eps, rel_tol=1e-12):
        raise ValueError(f"lip.reuse_adv_gradient=true: the adversarial image is x + h d, so "
                         f"lip.h must equal adv.eps (got lip.h={h}, adv.eps={eps}); set "
                         f"lip.h={eps}")
    fused = partial(adversarial_fd_objective, eps=eps, clip=clip, **settings)
    return no_perturbation, fused
