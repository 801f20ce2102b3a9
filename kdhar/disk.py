"""A full disk, recognised wherever it surfaces, so that a command can say so in one line.

It arrives in several forms: an OSError with ENOSPC or EDQUOT (a checkpoint, a copy into the
artifact store, a temporary file), or SQLite's "database or disk is full" (the default `./mlflow.db`
or `./optuna.db` on the same disk), the latter wrapped by SQLAlchemy and MLflow in exceptions of
their own. The modules that write say what was lost and what to do; `DiskFullError` carries that.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
SQLITE_FULL = "database or disk is full"  # sqlite3's message for SQLITE_FULL, kept by every wrapper


class DiskFullError(RuntimeError):
    """The disk filled up under a command; the message names where, what was lost and what to do."""


def disk_full(exc: BaseException | None) -> BaseException | None:
    """The first exception of `exc`'s chain that says the disk is full, or None."""
    return next((e for e in _chain(exc) if _says_full(e)), None)


def full_path(exc: BaseException | None) -> str | None:
    """The file a full disk refused, from the first OSError of `exc`'s chain that names one (a copy's
    destination), or None: SQLite's message names no file, but the copy that filled the disk before
    MLflow's store failed in turn usually sits further down the chain."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS and (e.filename2 or e.filename):
            return str(Path(e.filename2 or e.filename))
    return None


def _says_full(exc: BaseException) -> bool:
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return SQLITE_FULL in str(exc)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc`, then what it was raised from (or, failing that, while handling), and so on."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
