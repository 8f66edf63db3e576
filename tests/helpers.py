"""What more than one test file uses: the repository's paths, commands run as subprocesses,
runs built as run.py builds them, the W&B offline-run reader, the data-parallel rendezvous,
a callback that signals the run, a process holding a run folder, and the small linear and
convolutional problems of the closed-form tests. Fixtures live in tests/conftest.py; no test
file imports another (tests/test_layers.py checks it).

Light to import: run.py imports this module in its subprocesses when a test hands it
``SignalAt`` as a callback (``signal_at``), so wandb is imported only where its runs are read.
"""

import copy
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import TCPStore

from lipexp.attacks.threat import Norm

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"  # real MNIST etc.; never copied into the repo
FIXTURES = REPO / "tests" / "fixtures"  # run folders and results.json files of earlier versions


# --- commands and runs --------------------------------------------------------------------


def run_py(*args: str, timeout: int = 300, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    """``python run.py *args`` in the repository, output captured; ``env`` (default: this
    process's environment with W&B disabled) is the whole environment."""
    env = {**os.environ, "WANDB_MODE": "disabled"} if env is None else env
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def build_run(cfg):
    """``(module, datamodule, trainer)`` of a run config as ``lipexp.runs.train.run`` builds them,
    the end-of-training evaluation callback included."""
    from lipexp.evaluation.callback import RobustnessEvaluation
    from lipexp.runs.build import build_datamodule, build_evaluator, build_module, build_trainer

    module, datamodule = build_module(cfg), build_datamodule(cfg)
    evaluation = RobustnessEvaluation(build_evaluator(cfg), cfg.paths.output_dir)
    return module, datamodule, build_trainer(cfg, module, [evaluation])


def trainer_on(device) -> list[str]:
    """The overrides of a Trainer on ``device`` (the device fixture's)."""
    return ["trainer=gpu"] if device.type == "cuda" else []


def lip_overrides(lip: str) -> list[str]:
    """The overrides of a penalty named ``<lip>[-<method>[-point|-reuse]]``: ``lip2``,
    ``lip1-fd``, ``lip2-fd-point`` (fd's direction at the point), ``lip1-fd-reuse`` (the
    adversarial step's gradient reused)."""
    name, _, rest = lip.partition("-")
    method, _, option = rest.partition("-")
    return ([f"lip={name}"] + ([f"lip.method={method}"] if method else [])
            + {"": [], "point": ["lip.direction=point"],
               "reuse": ["lip.reuse_adv_gradient=true"]}[option])


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process at the end of training step ``step`` (1-based)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def signal_at(step: int, signum: int) -> str:
    """The override that adds ``SignalAt(step, signum)`` to a run's callbacks (run.py in the
    repository imports it from here)."""
    return f"+callbacks.signal={{_target_:{__name__}.SignalAt,step:{step},signum:{signum}}}"


def hold_lock(folder) -> subprocess.Popen:
    """Another process that owns the ``RunFolder`` ``folder`` until it is killed."""
    code = ("import sys, time; from lipexp.runs.folder import RunFolder\n"
            f"with RunFolder({str(folder.path)!r}).owned():\n"
            "    print('owned', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "owned"
    return proc


# --- W&B offline runs ---------------------------------------------------------------------
# Read the records of an offline W&B run (``run-*.wandb``) without network. wandb >= 0.19
# writes them from its Go core and no longer ships the Python reader, so the format is read
# here: a 7-byte header (":W&B", 2-byte magic, version), then LevelDB log blocks of 32 KiB
# whose records (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last)
# carry serialized ``wandb_internal_pb2.Record`` messages.

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer: padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += room  # zero-filled rest of the block
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        chunks = payload if kind in (FULL, FIRST) else chunks + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def summary_keys(run_dir: str | Path) -> set[str]:
    """Keys of every summary update and history row of the offline run in ``run_dir``."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    keys: set[str] = set()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            keys |= {i.key or "/".join(i.nested_key) for i in record.summary.update}
        elif kind == "history":
            keys |= {i.key or "/".join(i.nested_key) for i in record.history.item}
    return keys


def run_record(run_dir: str | Path):
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


# --- the data-parallel rendezvous ---------------------------------------------------------
# A rendezvous for the data-parallel tests that cannot race for a port.
#
# Picking a free port (bind to port 0, close, hand the number to the ranks) leaves a window
# in which another process on the machine can take it. Here the test process itself holds
# the rendezvous: a ``TCPStore`` server on a port the kernel gave it, listening for the whole
# test. The ranks get ``MASTER_ADDR``/``MASTER_PORT`` of that store and
# ``TORCHELASTIC_USE_AGENT_STORE=True``, with which torch's ``env://`` rendezvous makes every
# rank, rank 0 included, a client of the store at ``MASTER_ADDR:MASTER_PORT`` instead of
# having rank 0 bind that port (torch/distributed/rendezvous.py: ``_env_rendezvous_handler``
# calls ``_create_c10d_store``, which opens a client, ``is_master=False``, when
# ``_agent_store_serves(MASTER_ADDR, MASTER_PORT)``; torchrun's agent works the same way).
# Lightning's DDP launch (``init_process_group`` with ``env://``) reads the same variables,
# and its subprocess launcher passes them on to the ranks it starts.
#
# One store serves ONE process group: ``destroy_process_group`` resets torch's group counter,
# so a second group over the same store would read the first one's keys and hang (a
# multirun's jobs share their rank-0 process: each job needs its own store).

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


# --- linear models ------------------------------------------------------------------------


def linear_model(d_in: int, k: int, dtype=torch.float32, seed: int | None = None, *,
                 device="cpu", init: str = "torch",
                 generator: torch.Generator | None = None) -> nn.Sequential:
    """``Flatten -> Linear(d_in, k)`` in ``dtype`` on ``device``; ``model[1]`` is the layer.

    ``init="torch"``: torch's default initialisation from the global generator, which
    ``seed``, where given, seeds first (what the test draws next follows from it too).
    ``init="normal"``: weights, then biases, N(0, 1) drawn in float32 from ``generator``
    (default: a new one seeded ``seed``); ``init="normal_weights"``: N(0, 1) weights and
    zero biases. Either way the layer's default initialisation is drawn first from the global
    generator and then overwritten.
    """
    if init not in ("torch", "normal", "normal_weights"):
        raise ValueError(f"init={init!r}")
    if init == "torch" and seed is not None:
        torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d_in, k))
    if init != "torch":
        g = torch.Generator().manual_seed(seed) if generator is None else generator
        with torch.no_grad():
            model[1].weight.copy_(torch.randn(k, d_in, generator=g))
            if init == "normal":
                model[1].bias.copy_(torch.randn(k, generator=g))
            else:
                model[1].bias.zero_()
    return model.to(device, dtype)


def linear_loss_gradient(model: nn.Module, x, y):
    """Closed form for a ``linear_model``: grad_x CE(Wx + b, y) = W^T (softmax(z) - onehot(y))."""
    lin = model[1]
    z = x.flatten(1) @ lin.weight.T + lin.bias
    r = z.softmax(1) - F.one_hot(y, lin.out_features).to(z.dtype)  # (B, K)
    return (r @ lin.weight).view_as(x)


def linear_problem(n=24, k=5, side=4, seed=0):
    """A linear classifier on images in the interior of [0, 1] and its exact distances."""
    g = torch.Generator().manual_seed(seed)
    model = linear_model(side * side, k, init="normal_weights", generator=g)
    x = 0.5 + 0.02 * torch.randn(n, 1, side, side, generator=g)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    y[:3] = (y[:3] + 1) % k  # three images misclassified clean: distance 0
    w = model[1].weight
    diff = w[y][:, None, :] - w[None, :, :]  # (n, k, d): w_y - w_j
    margin = z.gather(1, y[:, None]) - z  # (n, k): z_y - z_j
    exact = {}
    for norm, p in ((Norm.l2, 2), (Norm.linf, 1)):
        d = margin / diff.norm(p=p, dim=2)
        d[torch.arange(n), y] = torch.inf
        d = d.min(1).values.clamp_min(0)  # misclassified clean: 0
        exact[norm] = d.detach()
    return model, x, y, exact


# --- the defence tests' batch (tests/defences) ---------------------------------------------

DEFENCE_SHAPE, DEFENCE_K = (2, 3, 3), 4  # tiny images (C, H, W), classes


def defence_batch(b: int = 6, device="cpu", dtype=torch.float64):
    """``b`` images in the interior of [0, 1] and their labels, drawn on the CPU from a
    generator seeded 1 (the same numbers on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, *DEFENCE_SHAPE, generator=g, dtype=dtype) * 0.5 + 0.25
    y = torch.randint(0, DEFENCE_K, (b,), generator=g)
    return x.to(device), y.to(device)


# --- the attack tests' problems (tests/attacks) -------------------------------------------
# A linear model with exact distances, and a conv model whose modes and state an attack must
# leave as it found them.

ATTACK_K, ATTACK_SHAPE = 10, (1, 6, 6)  # classes, image shape (C, H, W)
ATTACK_D = 36  # input dimension C*H*W
DUAL = {Norm.l2: 2, Norm.linf: 1}  # the exact distance divides by the dual norm of w_y - w_j


def attack_linear_model(dtype=torch.float32, seed=0) -> nn.Module:
    """The attack tests' linear model: N(0, 1) weights and biases from a generator seeded
    ``seed``."""
    return linear_model(ATTACK_D, ATTACK_K, dtype, seed, init="normal")


def interior_batch(model: nn.Module, b: int = 32, wrong: int = 3, seed=1):
    """Images in [0.4, 0.6] (the box does not bind), labelled by the model except the first
    ``wrong`` (misclassified clean); drawn on the CPU, on the model's device and dtype."""
    g = torch.Generator().manual_seed(seed)
    x = (0.4 + 0.2 * torch.rand(b, *ATTACK_SHAPE, generator=g)).to(model[1].weight)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % ATTACK_K
    return x, y


def exact_distances(model: nn.Module, x, y, norm: Norm):
    """``min_{j != y} (z_y - z_j) / ||w_y - w_j||_*`` (0 where misclassified clean), in
    float64, with the minimizing perturbations (B, D): ``d u`` where ``u`` is the unit
    (in ``norm``) direction of steepest ascent of ``z_j - z_y``."""
    w, bias = model[1].weight.double(), model[1].bias.double()
    z = x.flatten(1).double() @ w.T + bias  # (B, K)
    dw = w[None] - w[y][:, None]  # (B, K, D): w_j - w_y
    margin = z.gather(1, y[:, None]) - z  # (B, K): z_y - z_j
    d = margin / torch.linalg.vector_norm(dw, ord=DUAL[norm], dim=2)
    d[torch.arange(len(y)), y] = torch.inf
    d, j = d.min(1)
    dw = dw[torch.arange(len(y)), j]  # (B, D)
    u = dw / dw.norm(dim=1, keepdim=True) if norm == Norm.l2 else dw.sign()
    return d.clamp_min(0.0), d.clamp_min(0.0)[:, None] * u


def max_rel_gap(found, exact) -> float:
    """The worst ``found / exact - 1`` over the images broken clean-correct. The tests bound
    it by the search's bracket, rtol = 2%: an exact attack fails at a size ``lo`` at most the
    exact distance (up to float32 rounding, ~1e-6 relative) and the search stops with
    ``found <= (1 + rtol) lo``. The sizes it tries sit where the search puts them, not at a
    boundary, so the gaps measured (at most 1.7%) stay well inside 2%; a start at the exact
    distance itself (the first-order estimate, PGDSearch) ends at 0 or 1.6% whichever way
    rounding decides there."""
    broken = exact > 0
    return ((found.double()[broken] - exact[broken]) / exact[broken]).max().item()


def conv_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, ATTACK_K),
    ).to(dtype)
    with torch.no_grad():  # non-trivial running statistics (eval mode matters), sensitive
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.01, 0.05)
        model[-1].weight.mul_(10.0)
        model[-1].bias.zero_()
    return model


def conv_batch(model: nn.Module, b: int = 8):
    """Images drawn on the CPU, on the model's device and dtype."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(b, 3, 8, 8, generator=g, dtype=model[0].weight.dtype).to(model[0].weight)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    model.train()
    y[0] = (y[0] + 1) % ATTACK_K
    return x, y


def assert_model_left_as_found(attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], object],
                               device: torch.device | str = "cpu"):
    """``attack(model, x, y)`` on a conv model in mixed modes, with a frozen weight and
    gradients set, leaves modes, ``requires_grad``, gradients and state as they were
    (compared bit for bit: nothing is recomputed, only put back)."""
    model = conv_model().to(device)
    x, y = conv_batch(model)
    model.train()
    model[4].eval()  # mixed modes, each restored as it was
    model[3].weight.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())  # parameters and BN running statistics
    flags = [p.requires_grad for p in model.parameters()]

    attack(model, x, y)

    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all((p.grad == 7.0).all() for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# --- the typed lip config of a penalty partial (lipexp.defences.compose.compose) -----------

def lip_config_of(objective):
    """The typed ``LipConfig`` (or ``NoLipConfig``) that a partial of
    ``penalized_cross_entropy`` (or ``cross_entropy``) was built from, as build_module reads
    it from the run's config: ``compose(perturb, objective, lip_config_of(objective))``."""
    from enum import Enum

    from omegaconf import OmegaConf

    from lipexp.config.schema import lip_config

    func = getattr(objective, "func", objective)
    settings = {k: v.value if isinstance(v, Enum) else v
                for k, v in getattr(objective, "keywords", {}).items()}
    return lip_config(OmegaConf.create({"_target_": f"{func.__module__}.{func.__name__}",
                                        **settings}))
