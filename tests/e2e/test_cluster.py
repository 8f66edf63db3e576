"""Cluster launches without a cluster: a multirun through hydra-submitit-launcher's local
executor (the plugin of ``hydra/launcher=slurm``), and a data-parallel run whose processes
are started the way ``srun`` starts them, one per task with the SLURM variables set."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from ..helpers import REPO, clean_env, rendezvous, signal_at

TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "eval.n_images=6", "attacks=[l2_pgd,linf_pgd]", "eval.pictures=0",
        "attacks.l2_pgd.steps=3", "attacks.l2_pgd.targets=1",
        "attacks.linf_pgd.steps=3", "attacks.linf_pgd.targets=1", "model.width=8",
        "trainer.enable_progress_bar=false", "eval.progress=false", "logger=none"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # same kernels, same sums in every run compared


def test_submitit_multirun_lands_each_job_and_reports_the_failed_one(tmp_path):
    """Three jobs, each a submitit job in its own process: two complete, each in its own
    folder; the third fails in its run (adv.eps=-1 composes, lipexp's checks refuse it), is
    recorded as failed, and the sweep exits non-zero naming that job's overrides."""
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local",
         "adv.eps=0.01,0.02,-1", *TINY, f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=clean_env(**ONE_THREAD))
    assert proc.returncode != 0
    assert "Error executing job with overrides: ['adv.eps=-1'" in proc.stderr
    assert "ValueError: adv.eps must be >= 0" in proc.stderr
    found = [json.loads(f.read_text()) for f in tmp_path.glob("*/results.json")]
    runs = {str(r["config"]["adv"]["eps"]).removesuffix(".0"): r for r in found}
    assert len(found) == 3 and len({r["output_dir"] for r in found}) == 3  # a folder each
    for eps in ("0.01", "0.02", "-1"):
        assert runs[eps]["status"] == ("failed" if eps == "-1" else "completed")
        # the job ran in a process of submitit's, not in the launcher's
        assert runs[eps]["provenance"]["command"][0].endswith("submitit/core/_submit.py")
    assert "adv.eps must be >= 0" in runs["-1"]["error"]
    assert runs["0.01"]["attacks"]["l2_pgd"]["n_images"] == 6
    assert runs["0.02"]["attacks"]["l2_pgd"]["n_images"] == 6
    # submitit's record of the three jobs: their logs and pickled results
    assert len(list(tmp_path.glob(".submitit/*/*_result.pkl"))) == 3


SLURM_RUN = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
             *[o for o in TINY if "limit_train_batches" not in o]]  # 5 steps of 2 x 128


def slurm_task(rank: int, env: dict[str, str]) -> dict[str, str]:
    """What srun gives task ``rank`` of ``srun --nodes=1 --ntasks-per-node=2``."""
    return {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
            "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
            "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "lipexp-test"}  # not bash/interactive, which Lightning skips


def srun(folder, *extra: str, **env: str) -> list[tuple[int, str]]:
    """``srun python run.py ...`` on one node with 2 tasks, as CPU processes meeting at a
    store of this process: each task's exit status and output."""
    with rendezvous() as meeting:
        base = clean_env(**meeting.env, **ONE_THREAD, **env)
        tasks = [subprocess.Popen([sys.executable, "run.py", *SLURM_RUN, *extra,
                                   f"hydra.run.dir={folder}"], cwd=REPO, text=True,
                                  env=slurm_task(rank, base), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
                 for rank in range(2)]
        try:
            outputs = [task.communicate(timeout=300)[0] for task in tasks]
        finally:
            for task in tasks:  # no rank left spinning after a timeout or an error
                task.kill()
        assert meeting.used()
    return [(task.returncode, output) for task, output in zip(tasks, outputs)]


@pytest.fixture(scope="module")
def srun_run(tmp_path_factory):
    """The folder of a run started by srun, and its tasks' exit statuses and outputs."""
    folder = tmp_path_factory.mktemp("srun") / "run"
    return folder, srun(folder)


def comparable(folder) -> dict:
    """results.json without what differs between two runs of the same training: the
    folder's path, the times."""
    results = json.loads((folder / "results.json").read_text().replace(str(folder), "<run>"))
    for key in ("started", "finished"):
        results.pop(key)
    for cost in results["evaluation"]["cost"].values():
        cost.pop("seconds"), cost.pop("images_per_s")
    results.get("pictures", {}).get("cost", {}).pop("seconds", None)
    return results


def weights(folder) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def initialized(output: str) -> list[tuple[str, str]]:
    """Lightning's line, one per process that joins the group: (global rank, world size)."""
    return re.findall(r"Initializing distributed: GLOBAL_RANK: (\d), MEMBER: \d/(\d)", output)


def test_srun_started_ranks_train_as_the_launched_ones(srun_run, tmp_path):
    """Two processes started as srun starts them: Lightning takes its ranks from SLURM
    (SLURMEnvironment: its requeue log line, each process its SLURM_PROCID) and starts no
    process of its own; rank 0 alone writes results.json, which is, times and paths aside,
    the one the same run writes when Lightning launches its ranks (trainer=ddp as usual)."""
    folder, tasks = srun_run
    for rank, (status, output) in enumerate(tasks):
        assert status == 0, output[-3000:]
        assert "SLURM auto-requeueing enabled" in output  # Lightning chose SLURMEnvironment
        # one process per task: a rank Lightning had started would write its line here too
        assert initialized(output) == [(str(rank), "2")]
    assert [output.count("Run folder:") for _, output in tasks] == [1, 0]  # rank 0's report
    assert sorted(p.name for p in folder.parent.rglob("results.json")) == ["results.json"]

    launched = tmp_path / "launched"
    with rendezvous() as meeting:
        proc = subprocess.run([sys.executable, "run.py", *SLURM_RUN,
                               f"hydra.run.dir={launched}"], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env=clean_env(**meeting.env, **ONE_THREAD))
        assert meeting.used()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SLURM auto-requeueing" not in proc.stdout
    # the check above sees launched ranks: here Lightning's own appears beside rank 0
    assert sorted(initialized(proc.stdout)) == [("0", "2"), ("1", "2")]

    assert comparable(folder)["status"] == "completed"
    assert comparable(folder) == comparable(launched)  # exactly: same code, threads, ranks
    assert_same_weights(folder, launched)


@pytest.mark.slow  # ~50 s; tests/runs/test_reliability.py's SIGUSR1 case: same code, one process
def test_srun_ranks_requeued_by_sigusr1_resume_as_uninterrupted(srun_run, tmp_path):
    """SLURM's warning (SIGUSR1, to every task) at step 3 of 5: both ranks stop after that
    step, its state saved; rank 0 alone asks scontrol to requeue the job. The requeued job
    (the same command, SLURM_RESTART_COUNT=1) continues by itself and ends with the
    uninterrupted run's results and weights."""
    reference, _ = srun_run
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol\n')
    (bin_dir / "scontrol").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    folder = tmp_path / "run"
    signal_at_3 = signal_at(3, int(signal.SIGUSR1))
    stopped = srun(folder, signal_at_3, PATH=path)
    assert all(status != 0 for status, _ in stopped)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "requeued", results.get("error")
    assert "stopped by SIGUSR1 after step 3" in results["error"]
    assert torch.load(folder / "checkpoints" / "step.ckpt",
                      weights_only=True)["global_step"] == 3
    assert (tmp_path / "scontrol").read_text().splitlines() == ["requeue 4242"]  # rank 0 only

    requeued = srun(folder, signal_at_3, PATH=path, SLURM_RESTART_COUNT="1")
    for status, output in requeued:
        assert status == 0, output[-3000:]
    done, expected = comparable(folder), comparable(reference)
    assert done["status"] == "completed"
    for key in ("config", "provenance"):  # the signal's callback, in config and command
        done.pop(key), expected.pop(key)
    assert done == expected
    assert_same_weights(folder, reference)


@pytest.fixture
def in_srun_task(monkeypatch):
    """This process as task 0 of a 2-task srun step (nothing is launched)."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in slurm_task(0, {}).items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_ranks_that_srun_did_not_start_are_refused_before_training(in_srun_task, make_cfg):
    from lipexp.runs.build import build_module, build_trainer, check_slurm_tasks

    cfg = make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=4", "logger=none")
    with pytest.raises(ValueError, match=r"= 4 ranks, but the SLURM job has SLURM_NTASKS=2"):
        build_trainer(cfg, build_module(cfg), [])
    ddp = cfg.trainer.strategy
    with pytest.raises(ValueError, match="SLURM_NTASKS=2"):
        check_slurm_tasks(ddp, 1, 1)  # one rank asked, two tasks started
    with pytest.raises(ValueError, match="SLURM_NTASKS=2"):
        check_slurm_tasks("ddp", 2, 2)  # 2 nodes asked, 1 given
    check_slurm_tasks(ddp, 2, 1)  # what srun started
    check_slurm_tasks(ddp, "auto", 1)  # Lightning resolves it
    check_slurm_tasks("auto", 1, 1)  # one device: no world (e.g. joblib jobs in an allocation)
    one_device = make_cfg("trainer=cpu", "logger=none")
    build_trainer(one_device, build_module(one_device), [])  # not refused
    in_srun_task.setenv("SLURM_JOB_NAME", "interactive")  # Lightning: not a SLURM launch
    check_slurm_tasks(ddp, 4, 1)
    in_srun_task.delenv("SLURM_NTASKS")  # not in a SLURM job step with tasks
    check_slurm_tasks(ddp, 4, 1)
