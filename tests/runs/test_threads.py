"""Torch's threads fitted to the CPUs a process may use (lipexp.runs.threads)."""

import os
from types import SimpleNamespace

import pytest
import torch

from lipexp.runs import threads


@pytest.fixture
def fitting(monkeypatch):
    """No user's choice when lipexp started, torch's default 4, the threads and the
    environment restored after the test."""
    n = torch.get_num_threads()
    monkeypatch.setattr(threads, "USERS_CHOICE", None)
    monkeypatch.setattr(threads, "TORCH_DEFAULT", 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # monkeypatch restores the variable
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    yield monkeypatch
    torch.set_num_threads(n)


def test_threads_are_the_quota_shared_by_the_processes(fitting):
    fitting.setattr(threads, "cpu_count", lambda: 5)  # e.g. a 5-CPU cgroup quota
    assert threads.fit_threads(processes=2) == 2  # 5 // 2
    assert torch.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"  # what DDP ranks started from here inherit


def test_each_call_fits_anew_at_most_torchs_default_and_at_least_one(fitting):
    """The jobs of one sweep process: a 4-rank job, then a 1-device one, which gets the CPUs
    back although the first set OMP_NUM_THREADS; never more than torch's default."""
    fitting.setattr(threads, "cpu_count", lambda: 8)
    assert threads.fit_threads(processes=4) == 2
    assert threads.fit_threads(processes=1) == 4  # torch's default, not 8
    assert os.environ["OMP_NUM_THREADS"] == "4"
    fitting.setattr(threads, "cpu_count", lambda: 1)
    assert threads.fit_threads(processes=4) == 1


def test_a_slurm_task_gets_at_most_its_cpus_per_task(fitting):
    """Without CPU binding a task's affinity mask is the whole allocation (here 16)."""
    fitting.setattr(threads, "TORCH_DEFAULT", 32)
    fitting.setattr(threads, "cpu_count", lambda: 16)
    fitting.setenv("SLURM_CPUS_PER_TASK", "4")
    assert threads.fit_threads() == 4
    fitting.setenv("SLURM_CPUS_PER_TASK", "")
    assert threads.fit_threads() == 16


def test_omp_num_threads_at_start_is_the_users_choice(fitting):
    torch.set_num_threads(2)
    fitting.setattr(threads, "USERS_CHOICE", "2")
    fitting.setattr(threads, "cpu_count", lambda: 1)
    assert threads.fit_threads() == 2 and torch.get_num_threads() == 2


def test_ranks_a_cluster_started_each_have_their_own_cpus():
    def trainer(external: bool | None, devices: int):
        environment = None if external is None else SimpleNamespace(
            creates_processes_externally=external)
        return SimpleNamespace(strategy=SimpleNamespace(cluster_environment=environment),
                               num_devices=devices)

    assert threads.node_processes(trainer(None, 1)) == 1  # one device, no cluster
    assert threads.node_processes(trainer(False, 4)) == 4  # Lightning starts the 4 ranks
    assert threads.node_processes(trainer(True, 4)) == 1  # srun started each rank
