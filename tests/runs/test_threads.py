"""Torch's threads fitted to the CPUs a process may use (lipexp.runs.threads)."""

import os

import pytest
import torch

from lipexp.runs import threads


@pytest.fixture
def restore_threads(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # monkeypatch restores it
    yield monkeypatch
    torch.set_num_threads(n)


def test_threads_are_capped_at_the_quota_shared_by_the_processes(restore_threads):
    torch.set_num_threads(3)
    restore_threads.setattr(threads, "cpu_count", lambda: 5)  # e.g. a 5-CPU cgroup quota
    assert threads.fit_threads(processes=2) == 2  # 5 // 2
    assert torch.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"  # what DDP ranks started from here inherit


def test_threads_are_never_raised_and_at_least_one(restore_threads):
    torch.set_num_threads(1)
    restore_threads.setattr(threads, "cpu_count", lambda: 8)
    assert threads.fit_threads() == 1
    torch.set_num_threads(2)
    restore_threads.delenv("OMP_NUM_THREADS")
    restore_threads.setattr(threads, "cpu_count", lambda: 1)
    assert threads.fit_threads(processes=4) == 1


def test_omp_num_threads_is_the_users_choice(restore_threads):
    torch.set_num_threads(2)
    restore_threads.setenv("OMP_NUM_THREADS", "2")
    restore_threads.setattr(threads, "cpu_count", lambda: 1)
    assert threads.fit_threads() == 2
