"""The one validation helper: every range check of a setting raises a ValueError that
names the setting, its allowed values and what was given."""


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``."""
    if not ok:
        raise ValueError(message)


class Stopped(BaseException):
    """A run stopped by a signal at a step boundary, its state saved (lipexp.runs.stopping).
    A BaseException, like KeyboardInterrupt: no ``except Exception`` on the way swallows it.
    ``status`` is what results.json records."""

    status = "stopped"


class Interrupted(Stopped):
    status = "interrupted"  # SIGINT (Ctrl-C)


class Terminated(Stopped):
    status = "terminated"  # SIGTERM (a scheduler's kill, scancel)


class Requeued(Stopped):
    status = "requeued"  # SLURM's warning signal (SIGUSR1): the job runs again, and resumes
