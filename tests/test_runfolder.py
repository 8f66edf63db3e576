"""results.json records a run's state: running while the block runs, then completed or
failed (with the error, re-raised); training and mode=eval share this one record."""

import json

import pytest

from lipexp.runfolder import RunFolder, RunFolderError


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


@pytest.mark.parametrize("error", [RuntimeError("diverged"), KeyboardInterrupt()])
def test_record_writes_failed_and_reraises(tmp_path, error):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(type(error)), folder.record({}) as results:
        results["partial"] = 1
        raise error
    saved = read(folder)
    assert saved["status"] == "failed" and saved["partial"] == 1
    assert saved["error"].startswith(type(error).__name__)
    assert folder.completed_results(resume=False) is None  # no checkpoint: start again


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
    folder.last.write_bytes(b"")
    with pytest.raises(RunFolderError, match="pass resume=true"):
        folder.completed_results(resume=False)
    assert folder.completed_results(resume=True) is None
    assert folder.resume_checkpoint(True) == str(folder.last)
    assert folder.resume_checkpoint(False) is None
