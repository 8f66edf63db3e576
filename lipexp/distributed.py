"""Data-parallel helpers: the penalty's max must span the WHOLE minibatch across ranks
(``gather_batch``), the evaluation splits its batches over ranks (``gather_objects``), and a
DDP job launched from a Hydra multirun runs each job once, in its own folder (``job_scope``).
"""

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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


# ---------------------------------------------------------------- launching DDP jobs

DDP_ARGV = "LIPEXP_DDP_ARGV"  # this job's overrides, read by run.py in DDP child processes
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def child_argv() -> list[str] | None:
    """In a DDP child process (rank >= 1) started by Lightning: the parent job's own
    command line (see ``job_scope``); None in any other process."""
    if os.environ.get(DDP_ARGV) and os.environ.get("LOCAL_RANK", "0") != "0":
        return json.loads(os.environ[DDP_ARGV])
    return None


@contextmanager
def job_scope(output_dir: str | os.PathLike) -> Iterator[None]:
    """One training job, DDP-safe inside a Hydra multirun.

    On entry: Lightning's DDP launcher starts ranks 1..N-1 by re-running ``sys.argv``, which
    under ``-m`` would run the whole sweep again, in the wrong folders; record this job's own
    overrides and folder, which run.py gives to the children instead (``child_argv``).
    On exit: undo what Lightning's DDP launch leaves behind, so that the next job of a sweep
    (in this process, with new ranks) starts its own: the process group, and the
    environment variables that would make it believe its ranks were already launched.
    """
    env_before = {k: os.environ[k] for k in DDP_ENV if k in os.environ}
    from hydra.core.hydra_config import HydraConfig  # imported here: only run() needs Hydra

    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
        os.environ[DDP_ARGV] = json.dumps(
            [*overrides, f'hydra.run.dir="{output_dir}"', "hydra.output_subdir=null"])
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key in DDP_ENV:
            if key in env_before:
                os.environ[key] = env_before[key]
            else:
                os.environ.pop(key, None)
