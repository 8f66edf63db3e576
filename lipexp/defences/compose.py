"""The training step's objective when the fd penalty meets an attack (docs/method.md,
"Finite-difference estimate of the gradient norm"), and every refusal of fd settings.

``compose`` turns the run's ``(perturb, objective)`` partials and its typed ``LipConfig``
into what the step runs; the two objectives that share the attack's passes
(``attack_fd_objective``, ``adversarial_fd_objective``) are here, and ``check_fd`` holds
each setting fd cannot run with, checked when the module is built, before any data is
read. Only what needs a forward pass to be seen (a batch norm layer called twice, a
SyncBatchNorm inside a custom model) is refused later, by lipexp.defences.batch_stats.
Above both the estimator (``lipexp.defences.fd``) and the penalty
(``lipexp.defences.penalty``), so neither imports the other's callers.
"""

import math
from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor, nn

from lipexp.config.schema import Direction, LipConfig, Method
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
from lipexp.defences.penalty import penalized
from lipexp.errors import require


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


def penalty_settings(lip: LipConfig) -> dict:
    """The keyword settings of ``penalized`` in ``lip``: its fd-only fields left out."""
    return {"dual_norm": lip.dual_norm, "lam": lip.lam, "lam_over_sqrt_n": lip.lam_over_sqrt_n,
            "scaling": lip.scaling, "target": lip.target, "squared": lip.squared}


# trainer.precision values whose weights are half precision: fd's step h d rounds away
HALF_WEIGHTS = ("16-true", "bf16-true", "transformer-engine", "transformer-engine-float16")
# the attack steps fd can share passes with, by the dual norm of their direction
SHARED_STEPS = {l2_gradient_step: (2, "adv=j2 with lip=lip2"),
                signed_gradient_step: (1, "adv=j1 with lip=lip1")}


def check_fd(lip: object, perturb: Callable, trainer: Mapping | None = None) -> None:
    """ValueError for a setting the fd penalty cannot run with: ``lip.reuse_adv_gradient``
    without fd, with ``lip.direction=point``, with an attack whose direction is not the
    penalty's (J2 pairs with Lip2, J1 with Lip1) or with ``lip.h`` unequal to ``adv.eps``
    (its adversarial image is ``x + h d``); and, of the ``trainer`` settings when given,
    SyncBatchNorm (fd holds each rank's statistics fixed; the shared passes do not),
    half-precision weights (the step ``h d`` is rounded away) and DeepSpeed (its own
    backward pass, which TF32 would enter). ``lip``: the run's typed lip config
    (``NoLipConfig``: nothing to check)."""
    if not isinstance(lip, LipConfig):
        return
    fd = lip.method is Method.fd
    require(not lip.reuse_adv_gradient or fd,
            f"lip.reuse_adv_gradient=true needs lip.method=fd, got {lip.method.value}")
    if not fd:
        return
    if lip.reuse_adv_gradient:
        require(lip.direction is not Direction.point,
                "lip.reuse_adv_gradient=true takes fd's direction from the attack's train-mode "
                "gradient; it cannot be combined with lip.direction=point")
        func = getattr(perturb, "func", perturb)
        require(func in SHARED_STEPS and SHARED_STEPS[func][0] == lip.dual_norm,
                "lip.reuse_adv_gradient=true shares the attack's direction with the penalty's: "
                "use adv=j2 with lip.dual_norm=2 or adv=j1 with lip.dual_norm=1 (got "
                f"{getattr(func, '__name__', func)} and dual_norm={lip.dual_norm})")
        eps = perturb.keywords["eps"]
        require(math.isclose(lip.h, eps, rel_tol=1e-12),
                f"lip.reuse_adv_gradient=true: the adversarial image is x + h d, so lip.h must "
                f"equal adv.eps (got lip.h={lip.h}, adv.eps={eps}); set lip.h={eps}")
    if trainer is None:
        return
    require(not (trainer.get("sync_batchnorm") and not lip.reuse_adv_gradient),
            "trainer.sync_batchnorm=true cannot be combined with lip.method=fd: the finite "
            "difference holds each rank's batch statistics fixed (docs/method.md). Keep batch "
            "normalization per rank (trainer.sync_batchnorm=false), or share J1/J2's passes "
            "(lip.reuse_adv_gradient=true), whose passes each use their own statistics.")
    precision = str(trainer.get("precision"))
    require(precision not in HALF_WEIGHTS,
            f"trainer.precision={precision} cannot be combined with lip.method=fd: the finite "
            "difference needs float32 weights (the step h d is rounded away in half "
            "precision). Use trainer.precision=bf16-mixed or 16-mixed, whose fd passes run in "
            "float32.")
    require("deepspeed" not in str(trainer.get("strategy")),
            "trainer.strategy=deepspeed cannot be combined with lip.method=fd: DeepSpeed runs "
            "its own backward pass, which TF32 would enter (fd's backward needs full float32: "
            "docs/method.md)")


def compose(perturb: Callable, objective: Callable, lip: object) -> tuple[Callable, Callable]:
    """``(perturb, objective)`` as the training step runs them (partials as Hydra builds
    them; ``lip`` the run's typed lip config, ``OmegaConf.to_object(cfg.lip)``). The fd
    penalty with J1/J2 uses the attack's gradient: ``lip.reuse_adv_gradient`` shares its
    passes (``adversarial_fd_objective``), ``lip.direction=attack`` its direction
    (``attack_fd_objective``); both then take the clean batch (``perturb`` passes it
    through). Anything else is returned as it is. ValueError from ``check_fd``."""
    check_fd(lip, perturb)
    if not isinstance(lip, LipConfig) or lip.method is not Method.fd:
        return perturb, objective
    step = STEPS.get(getattr(perturb, "func", perturb))
    if step is None or (lip.direction is Direction.point and not lip.reuse_adv_gradient):
        return perturb, objective  # J0, or d at the point: the estimator alone
    eps, clip = perturb.keywords["eps"], perturb.keywords.get("clip", True)
    if lip.reuse_adv_gradient:
        return no_perturbation, partial(adversarial_fd_objective, eps=eps, clip=clip,
                                        **penalty_settings(lip))
    return no_perturbation, partial(attack_fd_objective, step=step, eps=eps, clip=clip,
                                    h=lip.h, **penalty_settings(lip))
