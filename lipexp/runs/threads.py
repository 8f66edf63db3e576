"""Torch's CPU threads fitted to the CPUs this process may use.

torch starts one intra-op thread per core it sees, but a container's CPU quota (docker
``--cpus``, Kubernetes limits, some CI machines) does not hide cores: on a host with 64 cores
and a 2-CPU quota, 64 threads share 2 CPUs' time and small models run tens of times slower
(a 2-epoch digits run: 1 s on 2 visible cores, 54 s on such a machine). Lightning's DDP
divides the CPUs of the affinity mask among its processes, blind to quotas. joblib's
``cpu_count`` (loky) reads the cgroup v1/v2 quota and the affinity mask, so it is used as is;
a SLURM task gets at most its ``cpus_per_task``.
"""

import logging
import os

import torch
from joblib import cpu_count

log = logging.getLogger(__name__)

# Read once, when lipexp starts: whether the user (or a parent process) chose the threads,
# and torch's own number, the most a run gets. fit_threads sets OMP_NUM_THREADS itself for
# the processes a run starts, so the variable as it is later is no longer the user's word.
USERS_CHOICE = os.environ.get("OMP_NUM_THREADS")
TORCH_DEFAULT = torch.get_num_threads()


def fit_threads(processes: int = 1) -> int:
    """Torch's intra-op threads: ``min(torch's default, cpu_count() // processes)``, at least
    one, where ``processes`` is the number of this node's processes that share its CPUs;
    ``OMP_NUM_THREADS``, where set when lipexp started, decides instead. Also sets
    ``OMP_NUM_THREADS`` to that number, so that the processes started from this one
    (Lightning's DDP ranks) keep it. Every call fits anew (the jobs of a sweep in one
    process may differ in ``trainer.devices``). Returns the threads torch now uses."""
    if USERS_CHOICE is not None:
        return torch.get_num_threads()  # the user's choice, or a parent's
    threads = max(1, min(TORCH_DEFAULT, node_cpus() // max(1, processes)))
    if threads != torch.get_num_threads():
        log.info("torch threads: %d -> %d (of %d CPUs this process may use, cgroup quota and "
                 "affinity, for %d process(es); OMP_NUM_THREADS=N chooses)",
                 torch.get_num_threads(), threads, node_cpus(), processes)
        torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def node_cpus() -> int:
    """The CPUs this process may use: ``cpu_count()`` (quota and affinity), at most SLURM's
    ``SLURM_CPUS_PER_TASK`` where set (a task's share, whether or not the site binds tasks
    to CPUs; without binding each task's affinity mask is the whole allocation)."""
    cpus = cpu_count()
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cpus, int(per_task)) if per_task.isdigit() and int(per_task) > 0 else cpus


def node_processes(trainer) -> int:
    """The processes that share ``node_cpus()``: the trainer's devices where Lightning starts
    the ranks itself; one where a cluster started each rank (srun: each task its own
    ``cpus_per_task``; torchrun sets ``OMP_NUM_THREADS=1`` itself, which then decides)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is not None and environment.creates_processes_externally:
        return 1
    return max(1, int(trainer.num_devices))
