"""What the command line counts as the user's mistake: shown as one line, exit code 2, no traceback."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A mistake in the user's input: printed as one line, exit code 2."""

    exit_code = 2


def is_user_error(exc: BaseException) -> bool:
    """Whether an exception from below the command line is a mistake in the input (a bad file, value
    or reference) rather than a bug: those are shown as one line unless --debug is given."""
    from kdhar.checkpoint import CheckpointError
    from kdhar.data.index import MissingVideosError
    from kdhar.data.video import VideoError
    from kdhar.tracking import TrackingError, is_bad_reference

    if is_bad_reference(exc):
        return True
    return isinstance(exc, (ValueError, FileNotFoundError, MissingVideosError, VideoError, TrackingError, CheckpointError))


def operational_error(exc: BaseException) -> str | None:
    """The one line for something that happened to the command rather than a bug or a mistake in its
    input (a full disk, a worker killed outright), shown with exit code 1; None for anything else.

    kdhar's own errors for these say what was lost and what to do; a full disk that reaches the
    command line unnamed (SQLite's "database or disk is full" from MLflow's or Optuna's store, a file
    write) still gets one line rather than its chain of tracebacks."""
    from kdhar.disk import DiskFullError, disk_full, full_path
    from kdhar.experiments.executors.base import WorkerDied

    if isinstance(exc, (DiskFullError, WorkerDied)):
        return str(exc).strip().splitlines()[0]
    if disk_full(exc) is None:
        return None
    path = full_path(exc)
    if path is None:  # SQLite names no file
        return ("disk full: a SQLite database (the MLflow store's mlflow.db or Optuna's optuna.db) could not be "
                "written; free space on its disk and run the command again")
    return f"disk full at {path}: free space there and run the command again"
