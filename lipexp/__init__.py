"""lipexp: Lipschitz regularization of the loss, reproduced and extended (docs/method.md).

The public names for notebooks (docs/api.md): ``lipexp.load_run``, ``lipexp.evaluate`` and
``lipexp.Run``, from lipexp.api, imported on first use: ``import lipexp`` loads no torch.
"""

from lipexp.version import __version__

__all__ = ["Run", "__version__", "evaluate", "load_run"]
_API = ("Run", "evaluate", "load_run")  # lipexp.api's, loaded lazily


def __getattr__(name: str):
    """``lipexp.load_run`` etc.: lipexp.api's names, imported (with torch) when first asked
    for (PEP 562)."""
    if name in _API:
        from lipexp import api

        return getattr(api, name)
    raise AttributeError(f"module 'lipexp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
