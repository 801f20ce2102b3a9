"""Where runs go, and whether that store can be used: the tracking URI, fast checks of servers and
databases, and the one SQLite store open per process.

Where runs go: `MLFLOW_TRACKING_URI` when set (the team server, see docs/server.md), otherwise
MLflow's own default, a `mlflow.db` SQLite file in the working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


class TrackingError(Exception):
    """A tracking operation cannot proceed; the message says what to change."""


class TrackingUnavailableError(TrackingError):
    """The configured tracking server cannot be reached or refuses our requests."""


def tracking_uri() -> str:
    """Returns `MLFLOW_TRACKING_URI` if set, else MLflow's default (`sqlite:///<cwd>/mlflow.db`).

    MLflow keeps using an existing `./mlruns` file store when one holds experiments; this
    function reports whatever MLflow itself will use.
    """
    return mlflow.get_tracking_uri()


def use_tracking_uri(uri: str) -> None:
    """Points this process, and any it starts, at the tracking store `uri`."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)


def is_bad_reference(exc: BaseException) -> bool:
    """True when `exc` is MLflow's answer to a models:/ or runs:/ URI that names nothing or is malformed:
    the user's input rather than a fault of the store."""
    return isinstance(exc, MlflowException) and exc.error_code in (
        "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


# Database stores MLflow takes, by URI scheme (before any "+driver").
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def check_store(uri: str, timeout: float = 3.0) -> None:
    """Fails fast with a one-line message when a database or file tracking store is unusable: an
    unknown scheme, a SQLite file in a folder that does not exist, a database driver that is not
    installed, or a database that does not answer within `timeout` seconds (MLflow's own client
    retries for about two minutes first).

    Raises:
        TrackingUnavailableError: naming the URI (password masked) and what to do.
    """
    from urllib.parse import urlsplit

    shown = mask_uri(uri)
    scheme = urlsplit(uri).scheme.split("+")[0] if "://" in uri else ""
    if scheme in ("", "file"):
        folder = Path(urlsplit(uri).path if scheme else uri).expanduser().resolve().parent
        if not folder.is_dir():
            raise TrackingUnavailableError(f"tracking store {shown}: folder {folder} does not exist; create it or "
                                           "point MLFLOW_TRACKING_URI elsewhere")
        return
    if scheme not in DB_SCHEMES:
        raise TrackingUnavailableError(
            f"tracking URI {shown}: unknown scheme {scheme!r}; use http(s)://host:port (a server), sqlite:///path.db, "
            "postgresql://user@host/db or a folder")
    if scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if path and path != ":memory:" and not Path(path).expanduser().resolve().parent.is_dir():
            raise TrackingUnavailableError(f"tracking store {shown}: folder {Path(path).parent} does not exist; "
                                           "create it or point MLFLOW_TRACKING_URI elsewhere")
        if path and path != ":memory:":
            _open_sqlite_store(uri, Path(path).expanduser())
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(max(1, timeout))})
    except ModuleNotFoundError as exc:
        fix = f"pip install {exc.name}"
        if scheme == "postgresql" and exc.name == "psycopg":  # SQLAlchemy's default PostgreSQL driver
            fix = (f"pip install 'psycopg[binary]' (a kdhar dependency), or write the URI as "
                   f"{shown.replace(uri.split('://', 1)[0], 'postgresql+psycopg2', 1)}")
        raise TrackingUnavailableError(
            f"tracking store {shown}: its database driver {exc.name!r} is not installed; {fix}") from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise TrackingUnavailableError(f"tracking store {shown}: {str(exc).splitlines()[0]}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200]
        raise TrackingUnavailableError(f"tracking store {shown} does not answer: {reason}") from None
    finally:
        engine.dispose()


_OPENED: set[str] = set()


def _open_sqlite_store(uri: str, path: Path) -> None:
    """Opens a SQLite store once per process, under an exclusive lock on `<db>.lock`.

    Opening a new (or older) store runs MLflow's schema migrations; two commands doing that at once
    on one new mlflow.db fail with "table _alembic_tmp_tags already exists" or "expected to match
    one row ... in 'alembic_version'". The lock makes the second wait for the first.
    """
    if uri in _OPENED:
        return
    import fcntl

    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _OPENED.add(uri)


def full_disk_at(error: BaseException) -> str:
    """Where a full disk refused a write: the file an OSError names, else the SQLite store's file
    (SQLite's "database or disk is full" names none), else the store's URI."""
    from kdhar.disk import full_path

    uri = tracking_uri()
    return full_path(error) or (uri.split(":///", 1)[1] if uri.startswith("sqlite:///") else mask_uri(uri))


def mask_uri(uri: str) -> str:
    """The URI with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@/]+@", r"\1***@", uri)


# The API call of `check_server` waits longer than /health: a signed-in request makes the server
# check the password, a deliberately slow hash, which took over 3 s on 2 busy cores.
SIGN_IN_TIMEOUT_S = 15.0


def check_server(uri: str, timeout: float = 3.0) -> None:
    """Fails fast with a one-line message when an http(s) tracking server is unusable.

    Without this, MLflow's client retries with back-off for minutes before giving up.
    Other URIs go through `check_store`.

    Raises:
        TrackingUnavailableError: the server is down, rejects our Host header, needs credentials or
            rejects the ones given.
    """
    if not uri.startswith(("http://", "https://")):
        check_store(uri, timeout)
        return
    hint = (
        "Start it with `docker compose up` or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
    )
    base = uri.rstrip("/")
    try:
        requests.get(f"{base}/health", timeout=timeout).raise_for_status()
        # /health is exempt from the server's Host and auth checks; a real API call is not.
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get(
            "MLFLOW_TRACKING_PASSWORD"
        )
        api = requests.get(
            f"{base}/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            auth=(user, password) if user and password else None,
            timeout=max(timeout, SIGN_IN_TIMEOUT_S),
        )
    except requests.RequestException as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:200]
        raise TrackingUnavailableError(
            f"MLflow tracking server at {uri} is not reachable: {reason}. {hint}"
        ) from exc
    if api.status_code == 401:
        raise TrackingUnavailableError(_sign_in_problem(uri, user, password))
    if api.status_code == 403:
        raise TrackingUnavailableError(
            f"MLflow tracking server at {uri} refused the request ({api.text.strip()[:100]}): "
            "add this host name to the server's --allowed-hosts"
        )
    if api.status_code >= 500:
        raise TrackingUnavailableError(
            f"MLflow tracking server at {uri} is not reachable: HTTP {api.status_code}. {hint}"
        )


def _sign_in_problem(uri: str, user: str | None, password: str | None) -> str:
    """Why a server answered 401: no credentials, half of them, or credentials it rejected (a typo
    in the password is not a missing one)."""
    if user and password:
        return (f"MLflow tracking server at {uri} rejected the credentials of user {user!r}: check "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if user or password:
        given, absent = (("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if user
                         else ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"))
        return f"MLflow tracking server at {uri} needs {absent} too: only {given} is set"
    return (f"MLflow tracking server at {uri} needs credentials: set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD")


def _client() -> MlflowClient:
    """A client of the configured store, checked first so an unusable one fails in one line (for the
    modules of this package; callers outside it use their functions)."""
    uri = tracking_uri()
    check_server(uri)
    return MlflowClient(tracking_uri=uri)
