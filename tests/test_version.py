"""lipexp's recorded version follows the source tree, not a stale editable install."""

from lipexp import version as v


def test_the_source_trees_version_wins_over_stale_metadata(tmp_path):
    assert v.__version__ == v.source_version()  # run from the repository here
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "lipexp"\nversion = "9.9.9"\n')
    assert v.source_version(pyproject) == "9.9.9"
    pyproject.write_text('[project]\nname = "other"\nversion = "1.0"\n')
    assert v.source_version(pyproject) is None  # another project's file: not ours
    pyproject.write_text("not toml [")
    assert v.source_version(pyproject) is None
    assert v.source_version(tmp_path / "missing.toml") is None
