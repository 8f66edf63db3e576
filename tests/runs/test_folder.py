"""results.json records a run's state: running while the block runs, then completed,
failed, interrupted or terminated (with the error, re-raised); training and mode=eval share
this one record. The lock file, the config check and the checkpoints a resume starts from."""

import json
import logging
import os
import re
import sys

import pytest
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lipexp.errors import Interrupted, Terminated
from lipexp.runs.differences import config_differences
from lipexp.runs.folder import RunFolder, RunFolderError
from lipexp.runs.stopping import requeued

from ..helpers import hold_lock


def read(folder: RunFolder) -> dict:
    return json.loads(folder.results.read_text())


def test_record_writes_running_then_completed(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with folder.record({"config": {"seed": 3}}) as results:
        assert read(folder) == results and results["status"] == "running"
        results["clean"] = {"error": 0.25}
    saved = read(folder)
    assert saved["status"] == "completed" and saved["clean"] == {"error": 0.25}
    assert saved["config"] == {"seed": 3} and saved["started"] <= saved["finished"]
    assert folder.completed_results(resume=False) == saved  # a completed folder is not rerun


def lightning_exit_after_ctrl_c() -> SystemExit:
    """What Lightning raises for Ctrl-C inside fit: SystemExit(1), in the KeyboardInterrupt's
    handler (so with it as context)."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)
    except SystemExit as e:
        return e


@pytest.mark.parametrize("error,status", [
    (RuntimeError("diverged"), "failed"), (KeyboardInterrupt(), "interrupted"),
    (Interrupted("stopped by SIGINT"), "interrupted"),
    (lightning_exit_after_ctrl_c(), "interrupted"),
    (Terminated("stopped by SIGTERM"), "terminated"), (SIGTERMException(), "terminated"),
])
def test_record_writes_how_the_run_stopped_and_reraises(tmp_path, error, status):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(type(error)), folder.record({}) as results:
        results["partial"] = 1
        raise error
    saved = read(folder)
    assert saved["status"] == status and saved["partial"] == 1
    assert saved["error"].startswith(type(error).__name__)
    assert "continue" not in saved  # no checkpoint to continue from
    assert folder.completed_results(resume=False) is None  # no checkpoint: start again


def test_a_stopped_run_says_how_to_continue(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.last.parent.mkdir(parents=True)
    folder.last.write_bytes(b"")
    with pytest.raises(Terminated), folder.record({}):
        raise Terminated("stopped by SIGTERM")
    assert read(folder)["continue"] == f"resume=true continues from {folder.last}"


def test_other_ranks_write_nothing(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with folder.record({}, write=False):
        pass
    assert not folder.results.exists()


def test_an_unfinished_run_needs_resume(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(RunFolderError, match="no .*last.ckpt"):
        folder.completed_results(resume=True)
    folder.last.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, folder.last)
    with pytest.raises(RunFolderError, match="pass resume=true"):
        folder.completed_results(resume=False)
    assert folder.completed_results(resume=True) is None
    assert folder.resume_checkpoint(True) == str(folder.last)
    assert folder.resume_checkpoint(False) is None


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, caplog):
    folder = RunFolder(tmp_path / "run")
    folder.last.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, folder.last)
    step = folder.path / "checkpoints" / "step.ckpt"  # newer, cut short
    step.write_bytes(folder.last.read_bytes()[:2000])
    with caplog.at_level(logging.WARNING, logger="lipexp.runs.folder"):
        assert folder.resume_checkpoint(True) == str(folder.last)
    assert "step.ckpt: truncated or corrupt" in caplog.text
    folder.last.write_text("damaged")
    with pytest.raises(RunFolderError, match="no readable checkpoint.*last.ckpt: not a PyTorch"):
        folder.resume_checkpoint(True)


def test_resume_starts_from_the_newest_checkpoint(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run")
    (folder.path / "checkpoints").mkdir(parents=True)
    for i, name in enumerate(["checkpoints/best.ckpt", "checkpoints/last.ckpt",
                              "hpc_ckpt_1.ckpt", "checkpoints/step.ckpt"]):
        torch.save({"state_dict": {}}, folder.path / name)
        os.utime(folder.path / name, ns=(i * 10**9, i * 10**9))
    assert [p.name for p in folder.checkpoints()] == ["last.ckpt", "hpc_ckpt_1.ckpt",
                                                      "step.ckpt"]  # best.ckpt: never
    assert folder.resume_checkpoint(True) == str(folder.path / "checkpoints" / "step.ckpt")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not requeued()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeued()


CONFIG = {"seed": 0, "lip": {"lam": 0.1, "dual_norm": 2}, "adv": {"eps": 0.01},
          "model": {"width": 8}, "mode": "train",
          "trainer": {"max_epochs": 10, "devices": 1}, "logger": {"project": "a"},
          "paths": {"output_dir": "/x"}, "eval": {"lipschitz": True, "batch_size": 500}}


def changed(**sections) -> dict:
    return {**CONFIG, **{k: {**CONFIG[k], **v} for k, v in sections.items()}}


@pytest.mark.parametrize("older", [False, True])
def test_config_differences_list_what_changes_the_numbers(older):
    def diff(old, new):
        return config_differences(old, new, older_version=older)

    assert diff(CONFIG, CONFIG) == []
    assert diff(CONFIG, changed(lip={"lam": 0.3}, trainer={"devices": 2})) == [
        "lip.lam: 0.1 -> 0.3", "trainer.devices: 1 -> 2"]
    assert diff(CONFIG, changed(model={"width": 16})) == ["model.width: 8 -> 16"]  # not "mode"
    # how long to train, where to log and write, memory: free to change when continuing
    assert diff(CONFIG, changed(trainer={"max_epochs": 20}, logger={"project": "b"},
                                paths={"output_dir": "/y"}, eval={"batch_size": 50})) == []
    assert diff(CONFIG, {**CONFIG, "lip": {"lam": 0.1}}) == [
        "lip.dual_norm: 2 -> '(absent)'"]  # a removed setting is a difference
    added = diff(CONFIG, changed(trainer={"accumulate_grad_batches": 4}))
    # a setting the folder's run did not have: a difference, unless lipexp has added it since
    assert added == ([] if older else ["trainer.accumulate_grad_batches: '(absent)' -> 4"])


def test_config_differences_of_a_lipexp_0_1_folder():
    """Upgraded to today's names (lip.norm -> lip.dual_norm); what the upgrade fills in for
    settings lipexp 0.1 did not have (eval.lipschitz=false) is not held against the command."""
    old = {**CONFIG, "lip": {"lam": 0.1, "norm": 2}, "eval": {"batch_size": 500}}
    assert config_differences(old, CONFIG, older_version=True) == []
    assert config_differences(old, changed(lip={"dual_norm": 1}), older_version=True) == [
        "lip.dual_norm: 2 -> 1"]


def test_a_lipexp_0_3_evaluation_is_not_resumed_with_todays_search():
    """Resuming a lipexp 0.3 folder with the steps and targets it ran still differs in the
    search settings the upgrade fills in with the values that ran."""
    search = "lipexp.attacks.distance.PGDSearch"
    old = {**CONFIG, "attacks": {"l2_pgd": {"_target_": search, "steps": 20}}}
    today = {"_target_": search, "steps": 20, "factor": 1.25, "early_stop": True,
             "target_order": "nearest"}
    assert config_differences(old, {**CONFIG, "attacks": {"l2_pgd": today}},
                              older_version=True) == [
        "attacks.l2_pgd.early_stop: False -> True", "attacks.l2_pgd.factor: 2.0 -> 1.25",
        "attacks.l2_pgd.target_order: 'logit' -> 'nearest'"]
    full = {**today, "factor": 2.0, "early_stop": False, "target_order": "logit"}
    assert config_differences(old, {**CONFIG, "attacks": {"l2_pgd": full}},
                              older_version=True) == []


def test_a_folder_refuses_a_command_with_another_config(tmp_path, caplog):
    folder = RunFolder(tmp_path / "run")
    with folder.record({"config": CONFIG}):
        pass
    assert folder.completed_results(False, CONFIG)["status"] == "completed"
    with pytest.raises(RunFolderError,
                       match=r"completed run with another config.*lip.lam: 0.1 -> 0.3"):
        folder.completed_results(False, changed(lip={"lam": 0.3}))
    # only the evaluation differs (lipexp 0.4's cheaper search): the completed run stands
    with caplog.at_level(logging.WARNING, logger="lipexp.runs.folder"):
        done = folder.completed_results(False, changed(eval={"lipschitz": False}))
    assert done["status"] == "completed" and re.search(r"lipexp(\.cli)? eval ", caplog.text)
    with pytest.raises(RunFolderError, match=r"eval.lipschitz.*lip.lam"):
        folder.completed_results(False, changed(eval={"lipschitz": False}, lip={"lam": 0.3}))
    with pytest.raises(KeyboardInterrupt), folder.record({"config": CONFIG}):
        raise KeyboardInterrupt
    folder.last.parent.mkdir(parents=True)
    folder.last.write_bytes(b"")
    with pytest.raises(RunFolderError, match=r"unfinished run with another config.*adv.eps"):
        folder.completed_results(True, changed(adv={"eps": 0.1}))
    assert folder.completed_results(True, changed(trainer={"max_epochs": 30})) is None
    with pytest.raises(RunFolderError, match=r"unfinished run with another config"):
        folder.completed_results(True, changed(eval={"lipschitz": False}))  # not evaluated yet


def test_a_second_process_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    folder = RunFolder(tmp_path / "run")
    owner = hold_lock(folder)
    try:
        with pytest.raises(RunFolderError, match=f"in use by process {owner.pid} on "), \
                folder.owned():
            pass
    finally:
        owner.kill()  # SIGKILL: the lock file stays behind, naming a dead process
        owner.wait()
    assert json.loads(folder.lock.read_text())["pid"] == owner.pid
    with caplog.at_level(logging.WARNING, logger="lipexp.runs.folder"), folder.owned():
        assert json.loads(folder.lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {owner.pid}" in caplog.text
    assert not folder.lock.exists()  # released on leaving
    with folder.owned(write=False):  # data-parallel ranks > 0: rank 0 holds it
        assert not folder.lock.exists()


def test_a_lock_file_nobody_holds_is_taken_over_whatever_host_it_names(tmp_path, caplog):
    """The lock is the operating system's (flock), released when its process ends on any
    node (a requeued SLURM job lands on another one): the file's names are information."""
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.lock.write_text(json.dumps({"host": "node-17", "pid": 1, "since": "then",
                                       "command": "run.py lip.lam=1"}))
    with caplog.at_level(logging.WARNING, logger="lipexp.runs.folder"), folder.owned():
        assert json.loads(folder.lock.read_text())["pid"] == os.getpid()
    assert "taking over the lock of process 1 on node-17" in caplog.text


