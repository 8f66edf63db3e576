"""Per-image adversarial distances of a fixed-size attack, by a growing then bisected
search over the attack size (as the study measured them, with Foolbox's defaults).

The error curve of the attack follows: ``C(eps) = mean_i [d_i <= eps]``.
"""

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lipexp.attacks.pgd import to_norm
from lipexp.attacks.threat import THREATS, Norm
from lipexp.model_state import eval_mode

Attack = Callable[[nn.Module, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def adversarial_distances(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack,
    norm: Norm | str,
    eps_init: float | Tensor,
    eps_max: float,
    rtol: float = 0.02,
    max_iter: int = 64,
    targets: Tensor | None = None,
    factor: float = 2.0,
) -> Tensor:
    """The adversarial distance ``d_i`` of each image for ``attack(model, x, y, eps) ->
    (x_adv, success)`` (e.g. ``PGD``), measured in ``norm``; (B,), in ``x``'s dtype.

    - ``d_i = 0`` for an image misclassified clean (one forward pass in eval mode);
    - otherwise each image has its own bracket ``[lo, hi]``: ``lo`` the largest size at
      which the attack failed (0 at first), ``hi`` the norm of the smallest successful
      adversarial example found so far. From ``eps_init`` (one size, or one per image):
      while the attack fails, grow the size by ``factor``, trying ``eps_max`` itself
      before giving up (``d_i = +inf``: unbroken at ``eps_max``); while it succeeds with no
      failure yet, shrink ``hi`` by ``factor``. Each such step squares the image's factor,
      up to 2 (1.25, 1.5625, 2, 2, ...: small steps around a good first estimate, doubling
      far from it; with ``factor = 2``, plain doubling and halving). Then bisect, attacking
      at ``(lo + hi) / 2``, until ``hi - lo <= rtol * lo``; ``d_i = hi``.

    Guarantee: a finite ``d_i > 0`` is the exact norm of an example that the attack found
    and reported misclassified, so the model's true adversarial distance is ``<= d_i``; and
    the attack failed at a size ``lo >= d_i / (1 + rtol)``, so on the searched brackets
    ``d_i`` is within ``rtol`` (relative) of the smallest size at which the attack succeeds.
    (The criterion is relative to ``lo`` rather than ``hi`` so that, for an attack that is
    exact, ``d_i <= (1 + rtol) * true distance``.) Each round attacks only the images
    whose bracket is still open (a sub-batch). ``max_iter`` caps the rounds: an image still
    open then keeps the best example found (possibly +inf), with a warning.

    ``targets`` (B, k): per-image classes handed to each call as
    ``attack(..., targets=targets[idx])`` (PGD's targeted runs); None: not passed.

    Cost: about ``log2(d_i / eps_init) + log2(1 / rtol) + 2`` attack calls per image (about
    8 to 12 for sensible ``eps_init``), plus one forward pass; with ``factor = 1.25`` and
    ``eps_init`` within 25% of ``d_i``, about ``log2(0.25 / rtol) + 2`` (6).

    Example: d = adversarial_distances(model, x, y, PGD("l2", steps=10), "l2", 0.1, 20.0)  # (B,)
    """
    eps_init = torch.as_tensor(eps_init, dtype=x.dtype, device=x.device)
    if not (bool((eps_init > 0).all()) and eps_max > 0 and rtol > 0 and max_iter >= 1
            and 1 < factor <= 2):
        raise ValueError("need eps_init > 0, eps_max > 0, rtol > 0, max_iter >= 1 and "
                         "1 < factor <= 2")
    threat = THREATS[to_norm(norm)]
    x = x.detach()
    with torch.no_grad(), eval_mode(model), torch.autocast(x.device.type, enabled=False):
        wrong = model(x).argmax(1) != y  # (B,), in full precision even under bf16 autocast
    eps_max_t = torch.tensor(eps_max, dtype=x.dtype, device=x.device)
    lo = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    hi = torch.where(wrong, 0.0, torch.inf).to(lo)  # norm of the smallest example found
    eps = eps_init.expand(len(x)).clamp(max=eps_max).clone()  # the next size to try
    step = torch.full_like(lo, factor)  # (B,) each image's next growth / shrink factor
    open_ = ~wrong
    for _ in range(max_iter):
        idx = open_.nonzero()[:, 0]
        if not idx.numel():
            break
        e = eps[idx]
        aim = {} if targets is None else {"targets": targets[idx]}
        x_adv, success = attack(model, x[idx], y[idx], e, **aim)
        size = threat.norm(x_adv.detach() - x[idx])  # (b,), the found examples' norms
        h = torch.where(success, torch.minimum(hi[idx], size), hi[idx])
        lo_ = torch.where(success, lo[idx], torch.maximum(lo[idx], e))
        found, g = h.isfinite(), step[idx]
        # Unbroken: grow (eps_max is tried exactly, then given up). Broken, no failure yet:
        # shrink. Both: bisect; an inverted bracket (an example smaller than a failing
        # size) also closes.
        eps[idx] = torch.where(found, torch.where(lo_ > 0, (lo_ + h) / 2, h / g),
                               torch.minimum(g * e, eps_max_t))
        step[idx] = (g * g).clamp(max=2.0)
        open_[idx] = ~torch.where(found, h - lo_ <= rtol * lo_, e >= eps_max_t)
        hi[idx], lo[idx] = h, lo_
    if open_.any():
        warnings.warn(
            f"adversarial_distances: {int(open_.sum())} brackets still open after "
            f"max_iter={max_iter} rounds; their distances are loose (+inf if never broken)",
            stacklevel=2,
        )
    return hi
