"""Atomic writes: the target is replaced whole or not at all, with an ordinary file mode."""

import json
import logging
import math
import os
import stat

import numpy as np
import pytest

from lipexp.files import atomic_path, save_npz_atomic, write_json_atomic


def test_json_and_npz_are_written_whole(tmp_path):
    write_json_atomic(tmp_path / "a" / "r.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": [1, 2]}
    save_npz_atomic(tmp_path / "d.npz", {"v": np.arange(3)})
    np.testing.assert_array_equal(np.load(tmp_path / "d.npz")["v"], np.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "d.npz", "r.json"]  # no temp


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"old": True})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_files_get_the_mode_of_any_new_file(tmp_path):
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o640  # not mkstemp's 0600


def test_json_is_written_strict_and_unexplained_nulls_are_reported(tmp_path, caplog):
    path = tmp_path / "results.json"
    data = {"attacks": {"l2_pgd": {"median": math.inf, "n_unbroken": 7}},
            "clean": {"loss": np.float32("nan")}, "ok": [1.5, -math.inf]}
    with caplog.at_level(logging.WARNING, logger="lipexp.files"):
        write_json_atomic(path, data)

    def reject(token):
        raise ValueError(token)

    saved = json.loads(path.read_text(), parse_constant=reject)
    assert saved == {"attacks": {"l2_pgd": {"median": None, "n_unbroken": 7}},
                     "clean": {"loss": None}, "ok": [1.5, None]}
    assert "clean.loss, ok[1]" in caplog.text and "median" not in caplog.text
    assert data["attacks"]["l2_pgd"]["median"] == math.inf  # the caller's data is untouched
