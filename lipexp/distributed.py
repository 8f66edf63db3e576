"""Data-parallel helpers: the penalty's max must span the WHOLE minibatch across ranks
(``gather_batch``), and the evaluation splits its batches over ranks (``gather_objects``).
Launching DDP jobs from Hydra (torch-free, for run.py): ``lipexp.runs.ddp_launch``.
"""

import warnings

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def gather_objects(obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; for small results)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_batch(t: Tensor) -> Tensor:
    """Concatenate ``t`` (B, ...) of every rank along dim 0, keeping the autograd graph.

    ``torch.distributed.nn.functional.all_gather`` sums the incoming gradients over ranks in
    its backward, so after DDP divides by the world size each parameter gets the gradient a
    single process computes on the concatenated batch. One process: returns ``t`` itself.
    All ranks must pass the same batch size (the training loader drops the last batch).
    """
    if world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of torch.distributed._functional_collectives, a private
        # module whose names still change between releases; this public one still works.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(t), dim=0)  # (world * B, ...)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch normalization's running statistics) to every rank.

    DDP broadcasts them before each training forward, so after the last step each rank's
    statistics hold one more local update; a network evaluated on several ranks must be one
    network. No-op in one process."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
