"""Context managers that change a model's state for an attack or a measurement, and put
back exactly what they found (even on error): the model is an argument, never kept."""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters without ``requires_grad``, then each one's flag and ``.grad`` restored.

    Attacks that call ``loss.backward()`` (torchattacks' CW, for one) would otherwise
    accumulate into the parameters' gradients.
    """
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in saved:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
