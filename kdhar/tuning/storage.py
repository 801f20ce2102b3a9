"""Where a study lives: the Optuna storage URL (never a password on a command line), the database
opened with heartbeats so a dead worker's trial is failed and retried, and the dashboard command."""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from pathlib import Path

import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback


# SQLite rather than a journal file: Optuna's heartbeats only work with an RDB storage, so a
# single worker that was killed gets its stale trial failed and retried on the next run; it is
# also what optuna-dashboard and `mlflow.db` users already know. SQLite locks badly under
# concurrent writers: several workers need a server database (postgresql://...).
DEFAULT_STORAGE = "sqlite:///optuna.db"
# Where a storage URL with a password should come from: the environment, not a command line (where
# `ps` shows it) or an `mlflow run -P storage=...` parameter (which MLflow logs as a run param).
STORAGE_ENV = "KDHAR_OPTUNA_STORAGE"
# A killed worker's trial is failed once its heartbeat is older than the grace period; a trial is
# retried at most this many times, so a configuration that kills its worker every time stops.
MAX_RETRY = 2


class StorageUnavailableError(ConnectionError, ValueError):
    """The Optuna storage URL is malformed or its database cannot be reached."""


def mask_url(url: str) -> str:
    """The storage URL with its password replaced by ***, safe to log."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1] if "@" in url else url


def _with_driver(url: str) -> str:
    """Names the PostgreSQL driver that is installed: SQLAlchemy 2.1 maps a bare postgresql:// to
    psycopg 3; where only psycopg2 is installed (an environment from before kdhar required psycopg 3),
    the URL names it."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return url  # make_storage reports it
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def has_password(url: str) -> bool:
    """Whether a storage URL carries a password."""
    try:
        return sqlalchemy.engine.make_url(url).password is not None
    except sqlalchemy.exc.ArgumentError:
        return mask_url(url) != url


def storage_from_options(storage: str | None, storage_file: str | None) -> str | None:
    """The storage URL given by `--storage` (one without a password) or by the first line of the file
    `--storage-file` names; None leaves it to $KDHAR_OPTUNA_STORAGE, else ./optuna.db.

    A password on the command line would show in the process list, and under `mlflow run` in the
    project run's params and its "Running command" log line, so it is refused.

    Raises:
        ValueError: both options, a password in `storage`, or an unreadable or empty file.
    """
    if storage and storage_file:
        raise ValueError("give --storage or --storage-file, not both")
    if storage:
        if has_password(storage):
            raise ValueError(f"--storage {mask_url(storage)}: a password on the command line shows in the process "
                             f"list and in MLflow's params and logs; set {STORAGE_ENV} to the URL instead, or put it "
                             "in a file and give --storage-file (-P storage_file=... with mlflow run)")
        return storage
    if not storage_file:
        return None
    try:
        lines = Path(storage_file).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--storage-file {storage_file}: cannot read it ({exc.strerror or exc})") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"--storage-file {storage_file} is empty: write the storage URL on its first line")
    return lines[0].strip()


def storage_url(url: str | None) -> str:
    """The storage to use: `url` if given, else $KDHAR_OPTUNA_STORAGE, else ./optuna.db."""
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def make_storage(url: str | None, heartbeat_interval: int = 60, grace_period: int | None = None) -> RDBStorage:
    """Opens (creating the tables if needed) the study database at `url` (None: ./optuna.db).

    Heartbeats every `heartbeat_interval` seconds let other workers fail a trial whose worker died
    (no heartbeat for `grace_period`, default twice the interval) and queue a retry of it.

    Raises:
        ValueError: a heartbeat interval below 1 s, or a grace period shorter than the interval.
        StorageUnavailableError: the URL is malformed or its database cannot be reached.
    """
    if heartbeat_interval < 1:
        raise ValueError(f"--heartbeat-interval {heartbeat_interval}: must be at least 1 second")
    if grace_period is not None and grace_period < heartbeat_interval:
        raise ValueError(f"--grace-period {grace_period}: must be at least the heartbeat interval "
                         f"({heartbeat_interval} s), or a live trial would be failed between two heartbeats")
    url = storage_url(url)
    shown = mask_url(url)
    with warnings.catch_warnings():
        # heartbeat_interval is flagged experimental; it is the documented way to survive dead workers
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            for attempt in range(3):
                try:
                    return RDBStorage(
                        _with_driver(url),
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                    )
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                    # Workers started together race to create the schema on an empty database; the
                    # loser sees a duplicate type/table and simply opens what the winner created.
                    if attempt == 2:
                        raise
                    time.sleep(1.0 + attempt)
        except sqlalchemy.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "connection failed"
            raise StorageUnavailableError(
                f"cannot reach the Optuna storage {shown}: {reason}; check that the database server is "
                "running and the URL (host, port, user, database) is right"
            ) from None
        except ImportError:
            raise StorageUnavailableError(
                f"Optuna storage {shown} needs a database driver that is not installed "
                "(PostgreSQL: pip install 'psycopg[binary]')"
            ) from None
        except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as exc:
            raise StorageUnavailableError(
                f"Optuna storage '{shown}' is not a usable database URL ({exc}); use e.g. "
                f"{DEFAULT_STORAGE} or postgresql://user@host:5432/optuna"
            ) from None


def dashboard_command(storage: str | None) -> str:
    """The shell command that opens optuna-dashboard on this storage, its password shown as ***."""
    return f"optuna-dashboard {mask_url(_with_driver(storage_url(storage)))}"
