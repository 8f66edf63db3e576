"""Data parallelism on CPU (gloo, 2 processes): the penalty's max spans the global batch and
the gradients equal those of one process on the concatenated batch. The ranks of every test
meet at a store the test holds (rendezvous, tests/helpers.py): no free port is picked and
released. The ranks' code is tests/ddp_worker.py."""

import json
import subprocess

import pytest
import torch
import torch.multiprocessing as mp

from lipexp.evaluation.evaluate import evaluate

from . import ddp_worker as w
from .helpers import REPO, clean_env, rendezvous
from .helpers import run_py as run_repo_py

WORLD = 2


def spawn(fn, *args):
    with rendezvous() as meeting:
        mp.spawn(fn, args=(WORLD, meeting.env, *args), nprocs=WORLD, join=True)
        assert meeting.used()


def run_py(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return run_repo_py(*args, timeout=timeout, env=clean_env(**env))


def reference():
    x, y = w.make_batch()
    return {(case, scaling): w.step_gradients(case, scaling, x, y, distributed=False)
            for case in w.CASES for scaling in ("per_example", "batch_mean")}


def max_relative_error(a, b) -> float:
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a, b))


def test_penalty_gradients_equal_single_process(tmp_path):
    spawn(w.gradients_worker, str(tmp_path), False)
    expected = reference()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key, (grads, logged_max) in got.items():
            ref_grads, ref_max = expected[key]
            assert max_relative_error(grads, ref_grads) < 1e-5, (rank, key)
            # float64 (ddp_worker): 1e-12 is ~5000 ulps, kernel and sum-order differences ~1
            assert logged_max == pytest.approx(ref_max, rel=1e-12), (rank, key)


def test_a_rank_local_max_is_caught(tmp_path):
    """The same comparison fails for a penalty that takes the max within each rank."""
    spawn(w.gradients_worker, str(tmp_path), True)
    expected = reference()
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    errors = [max_relative_error(got[k][0], expected[k][0]) for k in expected]
    assert max(errors) > 1e-3


@pytest.mark.numerics
def test_two_process_evaluation_equals_one_process(tmp_path, one_thread):
    """Bit equality is the property here, and it is legitimate: each rank attacks the batches
    ``b % world == rank`` of the single process, so both sides run the same code on the same
    batch shapes, and with the same threads (one: the workers' ``_init`` and ``one_thread``
    here), hence the same kernels and sums."""
    spawn(w.evaluation_worker, str(tmp_path))
    model, x, y = w.evaluation_problem()
    from lipexp.attacks.distance import PGDSearch
    from lipexp.attacks.threat import Norm

    single = evaluate(model, x, y, {"l2_pgd": PGDSearch("l2", steps=5, targets=2)},
                      error_at_sizes={Norm.l2: [0.1], Norm.linf: [8 / 255]}, batch_size=5,
                      lipschitz_iterations=5)
    got = torch.load(tmp_path / "eval.pt", weights_only=False)
    assert (got["distances"]["l2_pgd"] == single.distances["l2_pgd"]).all()
    for key in ("attacks", "stability", "lipschitz"):
        assert got["results"][key] == single.results[key], key


def test_ddp_run_on_digits_writes_results_once(tmp_path):
    out = tmp_path / "ddp"
    with rendezvous() as meeting:
        proc = run_py("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "trainer.max_epochs=2", "eval.n_images=20",
                      "trainer.enable_progress_bar=false", f"hydra.run.dir={out}",
                      env=meeting.env)
        assert meeting.used()  # Lightning's ranks met at the test's store
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Run folder:") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["config"]["trainer"]["devices"] == 2
    assert results["attacks"]["l2_pgd"]["n_images"] == 20
    assert sorted(p.name for p in out.rglob("results.json")) == ["results.json"]


def test_sync_batchnorm_with_the_penalty_is_refused(make_cfg):
    from lipexp.runs.build import build_module, build_trainer

    def build(cfg):
        return build_trainer(cfg, build_module(cfg), [])

    with pytest.raises(ValueError, match="SyncBatchNorm"):
        build(make_cfg("trainer.sync_batchnorm=true"))
    # fd holds each rank's batch statistics fixed: synchronised ones would not match them
    with pytest.raises(ValueError, match="sync_batchnorm=true cannot be combined with "
                                         "lip.method=fd"):
        build(make_cfg("trainer.sync_batchnorm=true", "lip.method=fd"))
    build(make_cfg("trainer.sync_batchnorm=true", "lip.method=fd",
                   "lip.reuse_adv_gradient=true"))  # each pass its own statistics
    build(make_cfg("trainer.sync_batchnorm=true", "lip=none"))  # no double backward: fine
    # an evaluation of such a checkpoint uses no trainer: nothing to refuse
    build_module(make_cfg("trainer.sync_batchnorm=true", "lip.method=fd"), training=False)


def test_ddp_multirun_runs_each_job_once_in_its_own_folder(tmp_path):
    """Lightning re-launches ranks with sys.argv; under -m that must not rerun the sweep.
    Each job's ranks form a new process group, so each job meets at its own store (one store
    serves one group: tests/helpers.py), given by Hydra's hydra.job.env_set per job
    number."""
    with rendezvous() as first, rendezvous() as second:
        ports = {f"LIPEXP_TEST_PORT_{i}": m.env["MASTER_PORT"]
                 for i, m in enumerate((first, second))}
        shared = {k: v for k, v in first.env.items() if k != "MASTER_PORT"}
        proc = run_py("-m", "adv=j0,j2", "trainer=ddp", "trainer.accelerator=cpu",
                      "trainer.devices=2", "trainer.max_epochs=1", "eval.n_images=10",
                      "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}",
                      "+hydra.job.env_set.MASTER_PORT='${oc.env:LIPEXP_TEST_PORT_${hydra.job.num}}'",
                      env={**shared, **ports})
        assert first.used() and second.used()
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {json.loads(p.read_text())["config"]["adv"]["_target_"].rsplit(".", 1)[1]:
             json.loads(p.read_text())["status"] for p in tmp_path.rglob("results.json")}
    assert found == {"no_perturbation": "completed", "l2_gradient_step": "completed"}
    assert proc.stdout.count("Run folder:") == 2


def test_slurm_launcher_config_composes(make_cfg):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "trainer=ddp",
                                           "trainer.num_nodes=2",
                                           "hydra.launcher.gpus_per_node=4",
                                           "paths.output_dir=/tmp/x"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 2 and launcher.tasks_per_node == 4  # one task per GPU


@pytest.mark.slow
@pytest.mark.parametrize("lip", ["lip=none", "lip.method=fd"])
def test_a_compiled_network_trains_under_ddp_as_the_uncompiled_one(tmp_path, lip):
    """+model.compile=true under 2-process DDP (gloo, CPU): the run completes, dynamo
    traces (only in the compiled run), and its weights after one epoch match the uncompiled
    run's (J2; with fd only the attack's gradient runs compiled)."""
    weights = []
    for option in ([], ["+model.compile=true"]):
        out = tmp_path / ("compiled" if option else "plain")
        with rendezvous() as meeting:
            proc = run_py("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                          "trainer.max_epochs=1", "eval.n_images=20", "logger=none",
                          "trainer.enable_progress_bar=false", lip, *option,
                          f"hydra.run.dir={out}", timeout=600,
                          env={**meeting.env, "TORCH_LOGS": "dynamo"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("torchdynamo start tracing" in proc.stderr) == bool(option)  # compiled or not
        state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        weights.append(state)
    assert weights[0].keys() == weights[1].keys()  # checkpoints hold the weights once, as net
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-5)
