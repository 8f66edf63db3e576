"""lipexp: Lipschitz regularization of the loss, reproduced and extended (docs/method.md)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lipexp")  # recorded in results.json (provenance.lipexp)
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "unknown"
