"""lipexp's version, as installed (recorded in results.json: provenance.lipexp)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lipexp")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "unknown"
