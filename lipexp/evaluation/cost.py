"""The cost of an attack: wall seconds and network passes, counted with module hooks.

Forward passes are counted as images through the network (a forward pre-hook adds the
batch size), backward passes as images whose logits' gradient was taken (a tensor hook on
each output that requires grad), so a pass over a sub-batch of 7 images counts 7. Divided
by the number of images evaluated, they are the "passes per image" of results.json. Hooks
rather than counters inside each attack: torchattacks' attacks (DeepFool, CW, Square,
AutoAttack) are counted the same way as lipexp's own.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Cost:
    forward: int = 0  # images through the network's forward
    backward: int = 0  # images through its backward (w.r.t. the input, or anything)
    seconds: float = 0.0  # wall time, the device synchronized

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.forward + other.forward, self.backward + other.backward,
                    self.seconds + other.seconds)

    def per_image(self, n: int) -> dict[str, float]:
        """results.json's entry: seconds, passes per image, images per second."""
        return {"seconds": self.seconds, "forward_per_image": self.forward / max(n, 1),
                "backward_per_image": self.backward / max(n, 1),
                "images_per_s": n / self.seconds if self.seconds > 0 else None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time the work, not the launch
        torch.cuda.synchronize(device)


@contextmanager
def counting(model: nn.Module, cost: Cost) -> Iterator[Cost]:
    """Add the passes through ``model`` and the wall seconds of the block to ``cost``."""

    def count_forward(module: nn.Module, args: tuple) -> None:
        cost.forward += len(args[0])

    def count_backward(module: nn.Module, args: tuple, out: Tensor) -> None:
        if isinstance(out, Tensor) and out.requires_grad:
            n = len(out)
            out.register_hook(lambda grad: _add_backward(cost, n))

    device = next(model.parameters()).device
    handles = [model.register_forward_pre_hook(count_forward),
               model.register_forward_hook(count_backward)]
    _sync(device)
    start = time.perf_counter()
    try:
        yield cost
    finally:
        _sync(device)
        cost.seconds += time.perf_counter() - start
        for handle in handles:
            handle.remove()


def _add_backward(cost: Cost, n: int) -> None:
    cost.backward += n
