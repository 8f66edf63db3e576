"""A rendezvous for the data-parallel tests that cannot race for a port.

Picking a free port (bind to port 0, close, hand the number to the ranks) leaves a window in
which another process on the machine can take it. Here the test process itself holds the
rendezvous: a ``TCPStore`` server on a port the kernel gave it, listening for the whole
test. The ranks get ``MASTER_ADDR``/``MASTER_PORT`` of that store and
``TORCHELASTIC_USE_AGENT_STORE=True``, with which torch's ``env://`` rendezvous makes every
rank, rank 0 included, a client of the store at ``MASTER_ADDR:MASTER_PORT`` instead of
having rank 0 bind that port (torch/distributed/rendezvous.py: ``_env_rendezvous_handler``
calls ``_create_c10d_store``, which opens a client, ``is_master=False``, when
``_agent_store_serves(MASTER_ADDR, MASTER_PORT)``; torchrun's agent works the same way).
Lightning's DDP launch (``init_process_group`` with ``env://``) reads the same variables,
and its subprocess launcher passes them on to the ranks it starts.

One store serves ONE process group: ``destroy_process_group`` resets torch's group counter,
so a second group over the same store would read the first one's keys and hang (a
multirun's jobs share their rank-0 process: each job needs its own store).
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch.distributed import TCPStore

HOST = "127.0.0.1"
# What a launcher tells its ranks: inherited from a test run inside a SLURM job or under
# torchrun, they would make Lightning take the test's subprocesses for managed ranks.
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_")
LAUNCHER_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
                 "GROUP_RANK", "LOCAL_WORLD_SIZE")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items()
               if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_KEYS}, **extra}


@dataclass
class Rendezvous:
    store: TCPStore

    @property
    def env(self) -> dict[str, str]:
        """The environment with which ``env://`` ranks meet at the store."""
        return {"MASTER_ADDR": HOST, "MASTER_PORT": str(self.store.port),
                "TORCHELASTIC_USE_AGENT_STORE": "True"}

    def used(self) -> bool:
        """Whether ranks met here (their keys are in the store; a new one holds none)."""
        return self.store.num_keys() > 0


@contextmanager
def rendezvous() -> Iterator[Rendezvous]:
    """A store held by this process, listening for the block."""
    meeting = Rendezvous(TCPStore(HOST, 0, is_master=True, wait_for_workers=False))
    try:
        yield meeting
    finally:
        del meeting.store  # the server stops with its last reference
