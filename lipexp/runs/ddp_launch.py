"""Launching DDP jobs from Hydra: each job of a multirun runs once, in its own folder, with
its own ranks. Torch-free at import, so that run.py can use it before Hydra parses the
command line (the data-parallel math is in ``lipexp.distributed``).

This concerns Lightning's own launch only (its subprocess launcher, which re-runs the
command for ranks 1..N-1). Processes started outside, one per rank (``srun`` under SLURM,
torchrun), are used as they are: Lightning's cluster environment then creates no process,
and ``child_argv`` is None in each of them (tests/e2e/test_cluster.py)."""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

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

    from lipexp.config.overrides import hydra_quoted

    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
        os.environ[DDP_ARGV] = json.dumps(
            [*overrides, f"hydra.run.dir={hydra_quoted(str(output_dir))}",
             "hydra.output_subdir=null"])
    try:
        yield
    finally:
        import torch.distributed as dist  # imported here: see the module docstring

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key in DDP_ENV:
            if key in env_before:
                os.environ[key] = env_before[key]
            else:
                os.environ.pop(key, None)
