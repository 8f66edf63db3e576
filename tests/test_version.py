"""lipexp's recorded version follows the source tree, not a stale editable install."""

import importlib
import importlib.metadata

import pytest

from lipexp import version as v

pytest.importorskip("tomllib", reason="Python 3.10: no tomllib, the metadata's version")


def test_the_source_trees_version_wins_over_stale_metadata(monkeypatch):
    """An editable install from before a version bump: its metadata says 0.0.1; the version
    recorded is the tree's pyproject.toml's."""
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1")
    try:
        stale = importlib.reload(v)
        assert stale.installed_version() == "0.0.1"
        assert stale.__version__ == stale.source_version() != "0.0.1"
    finally:
        monkeypatch.undo()
        importlib.reload(v)


def test_only_lipexps_own_pyproject_counts(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "lipexp"\nversion = "9.9.9"\n')
    assert v.source_version(pyproject) == "9.9.9"
    pyproject.write_text('[project]\nname = "other"\nversion = "1.0"\n')
    assert v.source_version(pyproject) is None  # another project's file: not ours
    pyproject.write_text("not toml [")
    assert v.source_version(pyproject) is None
    assert v.source_version(tmp_path / "missing.toml") is None
