"""lipexp's version (recorded in results.json: provenance.lipexp): the source tree's
pyproject.toml where lipexp runs from its repository, else the installed metadata.

An editable install (``pip install -e .``, ``make install``) keeps the metadata of the day it
was installed: after a pull that changes the version, ``importlib.metadata`` would record the
old one beside the new commit.
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def source_version(pyproject: Path = PYPROJECT) -> str | None:
    """``[project] version`` of ``pyproject`` if it is lipexp's, else None (no such file, an
    installed copy, or Python 3.10, which has no tomllib)."""
    try:
        import tomllib

        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (ImportError, OSError, ValueError):
        return None
    return str(project["version"]) if project.get("name") == "lipexp" and \
        "version" in project else None


def installed_version() -> str:
    try:
        return version("lipexp")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


__version__ = source_version() or installed_version()
