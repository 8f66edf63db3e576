"""Torch's CPU threads fitted to the CPUs this process may use.

torch starts one intra-op thread per visible core, but a container's CPU quota (docker
``--cpus``, Kubernetes limits, some CI machines) does not hide cores: on a host with 64 cores
and a 2-CPU quota, 64 threads share 2 CPUs' time and small models run tens of times slower
(a 2-epoch digits run: 1 s on 2 visible cores, 54 s on such a machine). joblib's ``cpu_count``
(loky) already reads the cgroup v1/v2 quota and the affinity mask, so it is used as is.
"""

import logging
import os

import torch
from joblib import cpu_count

log = logging.getLogger(__name__)


def fit_threads(processes: int = 1) -> int:
    """Cap torch's intra-op threads at ``cpu_count() // processes`` (at least one) unless
    ``OMP_NUM_THREADS`` chose them; also sets ``OMP_NUM_THREADS`` to that number, so that
    processes started from this one (Lightning's DDP ranks, whose own default divides
    ``os.cpu_count()``, blind to quotas) keep it. Returns the threads torch now uses."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()  # the user's choice, or a parent's
    budget = max(1, cpu_count() // max(1, processes))
    if torch.get_num_threads() > budget:
        log.info("torch threads: %d -> %d (the CPUs this process may use, cgroup quota and "
                 "affinity; OMP_NUM_THREADS=N chooses)", torch.get_num_threads(), budget)
        torch.set_num_threads(budget)
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return torch.get_num_threads()
