"""Worker processes for the data-parallel tests (torch.multiprocessing.spawn, gloo, CPU); the
ranks meet at a store the test holds (rendezvous, tests/helpers.py)."""

import os
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lipexp.defences.penalty as lipschitz
from lipexp.defences.adversarial import l2_gradient_step, no_perturbation, signed_gradient_step
from lipexp.defences.compose import compose

from .helpers import lip_config_of

B, N_IN, K = 8, 12, 4  # global batch, input dimension, classes

CASES = {  # name -> (perturbation, objective settings)
    "J0-Lip2": (no_perturbation, {"dual_norm": 2}),
    "J2-Lip2": (partial(l2_gradient_step, eps=0.3, clip=False), {"dual_norm": 2}),
    "J1-Lip1": (partial(signed_gradient_step, eps=0.3, clip=False),
                {"dual_norm": 1, "lam_over_sqrt_n": True}),
    # the finite-difference estimate: its max is the synchronized max of the estimates
    "J2-Lip2-fd": (partial(l2_gradient_step, eps=0.3, clip=False),
                   {"dual_norm": 2, "method": "fd", "h": 0.05}),
    "J1-Lip1-fd": (partial(signed_gradient_step, eps=0.3, clip=False),
                   {"dual_norm": 1, "lam_over_sqrt_n": True, "method": "fd", "h": 0.05}),
    "J2-Lip2-fd-point": (partial(l2_gradient_step, eps=0.3, clip=False),
                         {"dual_norm": 2, "method": "fd", "h": 0.05, "direction": "point"}),
    "J2-Lip2-fd-reuse": (partial(l2_gradient_step, eps=0.3, clip=False),
                         {"dual_norm": 2, "method": "fd", "h": 0.3, "reuse_adv_gradient": True}),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return nn.Sequential(nn.Flatten(), nn.Linear(N_IN, 16), nn.Tanh(), nn.Linear(16, K)).double()


def make_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 1, 3, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, K, (B,), generator=g)


class Step(nn.Module):
    """What the LightningModule's training step computes, behind DDP's forward as Lightning
    calls it: the objective at the perturbed batch."""

    def __init__(self, net, perturb, objective):
        super().__init__()
        self.net, self.perturb, self.objective = net, perturb, objective

    def forward(self, x, y):
        return self.objective(self.net, self.perturb(self.net, x, y), y)


def step_gradients(case: str, scaling: str, x, y, distributed: bool):
    perturb, kwargs = CASES[case]
    objective = partial(lipschitz.penalized_cross_entropy, lam=0.7, scaling=scaling, **kwargs)
    # as lipexp.runs.build.build_module does
    perturb, objective = compose(perturb, objective, lip_config_of(objective))
    step = Step(make_model(), perturb, objective)
    module = DistributedDataParallel(step) if distributed else step
    loss, logs = module(x, y)
    loss.backward()
    return [p.grad.clone() for p in step.parameters()], logs["grad_norm_max"].item()


def _init(rank: int, world: int, env: dict[str, str]) -> None:
    """Join the group at the test's store (``env``: its address; rendezvous, tests/helpers.py)."""
    os.environ.update(env)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    torch.set_num_threads(1)


def gradients_worker(rank: int, world: int, env: dict[str, str], out: str,
                     local_max: bool) -> None:
    """Each rank takes its contiguous share of the batch; saves its gradients and logs."""
    _init(rank, world, env)
    if local_max:  # the wrong implementation the test must catch: max over the rank only
        lipschitz.gather_batch = lambda t: t
    x, y = make_batch()
    share = slice(rank * B // world, (rank + 1) * B // world)
    results = {(case, scaling): step_gradients(case, scaling, x[share], y[share], True)
               for case in CASES for scaling in ("per_example", "batch_mean")}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()  # both ranks done before either tears down (gloo aborted otherwise)
    dist.destroy_process_group()


def evaluation_worker(rank: int, world: int, env: dict[str, str], out: str) -> None:
    """Every rank calls evaluate() on the same images; rank 0 saves the distances. Rank 1's
    BN statistics differ: evaluate() must use rank 0's network on every rank."""
    from lipexp.attacks.distance import PGDSearch
    from lipexp.attacks.threat import Norm
    from lipexp.evaluation.evaluate import evaluate

    _init(rank, world, env)
    model, x, y = evaluation_problem()
    if rank == 1:  # as after DDP training: one more local update of the BN statistics
        model[1].running_mean += 0.5
    ev = evaluate(model, x, y, {"l2_pgd": PGDSearch("l2", steps=5, targets=2)},
                  error_at_sizes={Norm.l2: [0.1], Norm.linf: [8 / 255]}, batch_size=5,
                  lipschitz_iterations=5)
    assert (ev is None) == (rank != 0)
    if rank == 0:
        torch.save({"distances": ev.distances, "results": ev.results}, f"{out}/eval.pt")
    dist.barrier()  # both ranks done before either tears down (gloo aborted otherwise)
    dist.destroy_process_group()


def evaluation_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 12, K)).eval()
    g = torch.Generator().manual_seed(2)
    return model, torch.rand(22, 1, 3, 4, generator=g), torch.randint(0, K, (22,), generator=g)
