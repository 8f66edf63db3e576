"""The one validation helper: every range check of a setting raises a ValueError that
names the setting, its allowed values and what was given."""


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``."""
    if not ok:
        raise ValueError(message)
