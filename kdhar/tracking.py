"""Experiment tracking: the only module that imports mlflow.

Where runs go: `MLFLOW_TRACKING_URI` when set (the team server, see docs/server.md), otherwise
MLflow's own default, a `mlflow.db` SQLite file in the working directory.

`RunTracker` opens one MLflow run as a context manager. Per-step metrics are queued and sent in
batches by a background thread so the training loop never waits on the network; everything else
(params, tags, artifacts, models) is sent at once. A run always ends with a final status: FINISHED,
FAILED when its body raised, KILLED when it was interrupted by SIGINT/SIGTERM.

Models are logged as MLflow 3 LoggedModels in the `pt2` (torch.export) format, which loads without
unpickling code. The registry is driven by aliases; see `promote_champion` for the champion rule.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import mlflow
import numpy as np
import requests
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

logger = logging.getLogger(__name__)

CHAMPION = "champion"
# Tags every kdhar run carries, so runs, models and reports can be filtered the same way.
# Copied from a run onto its logged model and registered version, so the registry says what a
# version is (method, teacher, data share, seed) without opening its run.
STANDARD_TAGS = ("role", "arch", "dataset", "dataset_fingerprint", "method", "teacher_arch", "teacher_run_id",
                 "fraction", "seed", "modality")


class TrackingError(Exception):
    """A tracking operation cannot proceed; the message says what to change."""


class TrackingUnavailableError(TrackingError):
    """The configured tracking server cannot be reached or refuses our requests."""


class RunTerminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives during a run.

    It derives from SystemExit so an uncaught one exits quietly with the shell's usual
    128 + signal code, after the run has been ended as KILLED.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


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


def mask_uri(uri: str) -> str:
    """The URI with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@/]+@", r"\1***@", uri)


def check_server(uri: str, timeout: float = 3.0) -> None:
    """Fails fast with a one-line message when an http(s) tracking server is unusable.

    Without this, MLflow's client retries with back-off for minutes before giving up.
    Other URIs go through `check_store`.

    Raises:
        TrackingUnavailableError: the server is down, rejects our Host header or needs credentials.
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
            timeout=timeout,
        )
    except requests.RequestException as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:200]
        raise TrackingUnavailableError(
            f"MLflow tracking server at {uri} is not reachable: {reason}. {hint}"
        ) from exc
    if api.status_code == 401:
        raise TrackingUnavailableError(
            f"MLflow tracking server at {uri} needs credentials: set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD"
        )
    if api.status_code == 403:
        raise TrackingUnavailableError(
            f"MLflow tracking server at {uri} refused the request ({api.text.strip()[:100]}): "
            "add this host name to the server's --allowed-hosts"
        )
    if api.status_code >= 500:
        raise TrackingUnavailableError(
            f"MLflow tracking server at {uri} is not reachable: HTTP {api.status_code}. {hint}"
        )


def _client() -> MlflowClient:
    uri = tracking_uri()
    check_server(uri)
    return MlflowClient(tracking_uri=uri)


def git_commit(path: str | Path | None = None) -> str | None:
    """Returns the commit checked out at `path` (default: cwd), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        # No git binary, not a repository, or no commit yet: the run is still worth tracking.
        return None
    return out.stdout.strip() or None


def standard_tags(
    role: str, arch: str, dataset: str, dataset_fingerprint: str
) -> dict[str, str]:
    """Builds the tags every run carries: role (teacher/student/...), arch, dataset, its fingerprint
    and, when available, the git commit of the code."""
    tags = {"role": role, "arch": arch, "dataset": dataset, "dataset_fingerprint": dataset_fingerprint}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        # The server rejects longer values; the full dict is kept as an artifact by log_params.
        text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return text


def _get_or_create_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException as exc:
            # Another worker created it between our lookup and create.
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment '{name}' is deleted: restore it with `mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}` or choose another experiment name"
        )
    return exp.experiment_id


class ExperimentMismatchError(TrackingError, ValueError):
    """`mlflow run` filed its run under another experiment than the one kdhar was asked for."""


DEFAULT_EXPERIMENT = "kdhar"  # where a plain `kdhar` command logs when no experiment is given


def project_run_id() -> str | None:
    """The run `mlflow run` opened for this command (MLFLOW_RUN_ID), which kdhar's run adopts; None outside it."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def project_experiment() -> str | None:
    """The experiment `mlflow run` filed the project run under (`--experiment-name`, else
    MLFLOW_EXPERIMENT_NAME, else `Default`); None outside `mlflow run`."""
    project = project_run_id()
    if not project:
        return None
    client = _client()
    try:
        run = client.get_run(project)
    except MlflowException:
        return None  # not a run of this store: MLflow itself reports it when the run starts
    return client.get_experiment(run.info.experiment_id).name


def resolve_experiment(requested: str | None) -> tuple[str, str | None]:
    """The experiment a command logs to, and a one-line note for the user when `mlflow run` chose it.

    An empty `requested` means "wherever `mlflow run` filed the project run", else
    MLFLOW_EXPERIMENT_NAME, else `kdhar`. kdhar's run *is* the project run, so an explicit
    `requested` must match the project run's experiment.

    Raises:
        ExperimentMismatchError: an explicit experiment other than the project run's.
    """
    actual = project_experiment()
    if actual is None:
        return requested or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT, None
    if requested and requested != actual:
        raise ExperimentMismatchError(
            f"`mlflow run` filed this run under experiment '{actual}', not '{requested}': add "
            f"--experiment-name {requested} to the mlflow run command, or leave out -P experiment"
        )
    note = None
    if not requested:
        note = (f"note: this run is in MLflow experiment '{actual}', where `mlflow run` filed it; to group runs "
                "in an experiment of their own, add --experiment-name NAME to mlflow run")
    return actual, note


def check_project_experiment(name: str) -> None:
    """Under `mlflow run`, refuses an experiment other than the project run's (see `resolve_experiment`).

    Raises:
        ExperimentMismatchError: naming the flag to add.
    """
    if name:
        resolve_experiment(name)


@dataclass(frozen=True)
class LoggedModelRef:
    """Where a logged model lives: `model_uri` loads it, `version` is set when it was registered."""

    model_uri: str
    model_id: str
    run_id: str
    registered_name: str | None = None
    version: str | None = None


class _MetricSender(threading.Thread):
    """Drains a queue of metrics into `log_batch` calls; whatever piled up during one request
    goes into the next, so batches grow exactly when the server is the bottleneck."""

    _STOP = object()

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        super().__init__(name=f"kdhar-metrics-{run_id[:8]}", daemon=True)
        self.client, self.run_id = client, run_id
        self.queue: queue.Queue[Any] = queue.Queue()
        self.error: BaseException | None = None

    def run(self) -> None:
        stop = False
        while not stop:
            batch = [self.queue.get()]
            while len(batch) < MAX_METRICS_PER_BATCH:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is self._STOP for item in batch)
            metrics = [item for item in batch if item is not self._STOP]
            try:
                if metrics and self.error is None:
                    self.client.log_batch(self.run_id, metrics=metrics)
            except Exception as exc:  # noqa: BLE001 - handed to the training thread by flush()
                self.error = exc
            finally:
                for _ in batch:
                    self.queue.task_done()

    def flush(self) -> None:
        self.queue.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise TrackingError(f"sending metrics of run {self.run_id} failed: {error}") from error

    def stop(self) -> None:
        self.queue.put(self._STOP)
        self.join()


# A run in progress sets its `heartbeat` tag (unix seconds) every HEARTBEAT_S; a RUNNING run of another
# machine whose heartbeat is older than STALE_S (KDHAR_STALE_AFTER overrides it) is taken for dead:
# its process cannot be asked, as one on this machine can (`host`, `pid`). Ten missed beats leave
# room for a slow tracking server and for clocks a few minutes apart.
HEARTBEAT_TAG = "heartbeat"
HEARTBEAT_S = 60.0
STALE_S = 600.0


def stale_after() -> float:
    """Seconds without a heartbeat after which another machine's RUNNING run counts as dead."""
    value = os.environ.get("KDHAR_STALE_AFTER", "")
    try:
        return float(value) if value.strip() else STALE_S
    except ValueError:
        raise ValueError(f"KDHAR_STALE_AFTER={value!r}: give seconds, e.g. 600") from None


class Heartbeat(threading.Thread):
    """Sets the `heartbeat` tag of the runs `run_ids()` names, now and every `interval` seconds,
    until `stop()`. A process killed outright stops beating, which is how other machines see it."""

    def __init__(self, run_ids: Any, interval: float | None = None) -> None:
        super().__init__(name="kdhar-heartbeat", daemon=True)
        self.run_ids, self.interval = run_ids, HEARTBEAT_S if interval is None else interval
        self._stopped = threading.Event()

    def beat(self) -> None:
        client, now = _client(), str(int(time.time()))
        for run_id in list(self.run_ids()):
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, now)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the run's own calls report errors
                logger.debug("heartbeat of run %s not sent", run_id, exc_info=True)

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stopped.set()


# Beside `host` and `pid`: when that process started (boot id and start time in clock ticks from
# /proc), since a pid is reused: after a container restart pid 1 is alive again, but another process.
PID_STARTED_TAG = "pid_started"


def process_start(pid: int) -> str | None:
    """`<boot id>:<start time in clock ticks>` of process `pid`, which no later process with the same
    pid shares; None where /proc cannot tell (another OS, or no such process)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 is the start time; the command name (field 2) may hold spaces and ')', so count
    # from the last ')', after which field 3 comes.
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{boot}:{fields[22 - 3]}"


def process_tags() -> dict[str, str]:
    """`host`, `pid` and `pid_started` of this process: what `seems_dead` judges a run or claim by."""
    return stamp_process_start({"host": socket.gethostname(), "pid": str(os.getpid())})


def stamp_process_start(tags: dict[str, str]) -> dict[str, str]:
    """`tags` with `pid_started` added when their `pid` is this process's own."""
    started = process_start(os.getpid()) if tags.get("pid") == str(os.getpid()) else None
    return {**tags, PID_STARTED_TAG: started} if started else tags


def seems_dead(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the process behind a RUNNING run (or grid claim) is gone: on this machine its `pid`
    is not alive, or is alive but started at another time than `pid_started` says (a reused pid);
    on another its `heartbeat` is older than `stale_after()`. A run with neither (from before these
    tags) is never taken for dead."""
    if tags.get("host") == socket.gethostname():
        if not tags.get("pid"):
            return False
        pid = int(tags["pid"])
        if not process_alive(pid):
            return True
        recorded = tags.get(PID_STARTED_TAG)
        return bool(recorded) and process_start(pid) not in (None, recorded)
    beat = tags.get(HEARTBEAT_TAG)
    if not beat:
        return False
    return (time.time() if now is None else now) - float(beat) > stale_after()


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunTracker:
    """One MLflow run, opened by `with RunTracker(...) as run:`.

    Args:
        experiment: experiment name; created when missing.
        run_name: display name of a new run.
        tags: tags set when the run starts (see `standard_tags`).
        resume_run_id: re-open this run instead of creating one (its params must not change).
        nested: create the run under the run currently open in this thread.
        parent_run_id: create the run under this run (e.g. a study's parent run).

    Under `mlflow run`, MLflow passes its own run in `MLFLOW_RUN_ID`; the first top-level tracker
    opened adopts that run, so the project run and ours are the same: it gets our name, tags and
    description, and the runs table shows it as such. The project run already holds the entry
    point's raw parameter strings; a param of ours that would contradict one is logged as `<key>.used`.
    """

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
        resume_run_id: str | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
    ) -> None:
        self.experiment = experiment
        self.run_name = run_name
        # A run that names its process (`pid`) also records when it started, for `seems_dead`.
        self.tags = stamp_process_start({k: str(v) for k, v in (tags or {}).items()})
        self.resume_run_id = resume_run_id
        self.nested = nested
        self.parent_run_id = parent_run_id
        self.run_id: str = ""
        self._client: MlflowClient | None = None
        self._sender: _MetricSender | None = None
        self._old_handlers: dict[int, Any] = {}
        self._closing = False
        self._signal: int | None = None  # the SIGTERM received during this run, if any

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> RunTracker:
        self._client = _client()
        nested = self.nested or self.parent_run_id is not None
        project = None if self.resume_run_id else project_run_id()
        self._preset_params: dict[str, str] = {}
        if project and not nested and mlflow.active_run() is None:
            check_project_experiment(self.experiment)  # this tracker adopts the project run
            self._preset_params = dict(self._client.get_run(project).data.params)
        elif project:
            project = None  # a nested run is a new run: MLflow would otherwise take MLFLOW_RUN_ID for it
        experiment_id = _get_or_create_experiment(self._client, self.experiment)
        if self.resume_run_id:
            run = self._get_run(self.resume_run_id)
            if run.info.experiment_id != experiment_id:
                raise TrackingError(
                    f"run {self.resume_run_id} belongs to experiment {run.info.experiment_id}, "
                    f"not '{self.experiment}': resume it with its own experiment name"
                )
            active = mlflow.start_run(run_id=self.resume_run_id, tags=self.tags or None)
        else:
            kept = None if project else os.environ.pop("MLFLOW_RUN_ID", None)
            try:
                active = mlflow.start_run(
                    experiment_id=experiment_id,
                    run_name=self.run_name,
                    tags=self.tags or None,
                    nested=nested,
                    parent_run_id=self.parent_run_id,
                )
            finally:
                if kept:
                    os.environ["MLFLOW_RUN_ID"] = kept
        self.run_id = active.info.run_id
        self._sender = _MetricSender(self._client, self.run_id)
        self._sender.start()
        self._heartbeat = Heartbeat(lambda: [self.run_id])
        self._heartbeat.beat()
        self._heartbeat.start()
        self._install_signal_handlers()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A second SIGTERM while we end the run would otherwise leave it RUNNING.
        self._closing = True
        status = _status_for(exc)
        flush_error: TrackingError | None = None
        try:
            self._sender.flush()
        except TrackingError as err:
            flush_error = err
            status = "FAILED" if status == "FINISHED" else status
        self._sender.stop()
        self._heartbeat.stop()
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)
        else:
            self._client.set_terminated(self.run_id, status=status)
        self._restore_signal_handlers()
        if flush_error is not None:
            if exc is None:
                raise flush_error
            # The body's own exception is the one to propagate; keep the lost metrics visible.
            logger.error("%s (run %s ended %s)", flush_error, self.run_id, status)
        if exc is None and self._signal is not None:
            raise RunTerminated(self._signal)

    def _install_signal_handlers(self) -> None:
        # Python only lets the main thread install handlers; trackers opened in worker threads
        # (parallel trials) rely on the main thread's tracker for signals.
        if threading.current_thread() is not threading.main_thread():
            return
        self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum
        if self._closing:
            return
        # Python prints and drops an exception raised inside a finalizer (decord's readers free
        # their handles in __del__), which would lose the signal: the next logging call raises it.
        while frame is not None:
            if frame.f_code.co_name == "__del__":
                return
            frame = frame.f_back
        raise RunTerminated(signum)

    def _raise_if_signalled(self) -> None:
        if self._signal is not None and not self._closing:
            raise RunTerminated(self._signal)

    def _get_run(self, run_id: str) -> Any:
        try:
            return self._client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(
                f"run {run_id} does not exist at {tracking_uri()}: check the run id and "
                "MLFLOW_TRACKING_URI"
            ) from exc

    # -- logging ---------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        """Logs params as strings; values longer than MLflow's limit are shortened and the full
        set is stored as `params.json`. On a resumed run, changed values raise TrackingError."""
        values = {key: _param_value(value) for key, value in params.items()}
        preset = self._preset_params
        values = {(f"{k}.used" if preset.get(k, v) != v else k): v for k, v in values.items()}
        if self.resume_run_id:
            old = self._get_run(self.run_id).data.params
            changed = [f"{k} ({old[k]} -> {v})" for k, v in values.items() if k in old and old[k] != v]
            if changed:
                raise TrackingError(
                    f"cannot resume run {self.run_id} with different parameters: "
                    f"{', '.join(changed[:5])}; start a new run instead"
                )
        items = [Param(k, v) for k, v in values.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        if any(len(str(v)) > MAX_PARAM_VAL_LENGTH for v in params.values()):
            self.log_dict({k: str(v) for k, v in params.items()}, "params.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queues metrics for the background sender; returns without waiting for the server.

        A failure to send surfaces as TrackingError on the next call or when the run ends.
        """
        self._raise_if_signalled()
        sender = self._sender
        if sender.error is not None:
            sender.flush()
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            sender.queue.put(Metric(key, float(value), now, step))

    def flush(self) -> None:
        """Blocks until every queued metric has reached the tracking store."""
        self._sender.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Sets run tags (values stringified)."""
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a local file or directory into the run's artifacts."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: cannot log a missing file as an artifact")
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, fig: Any, name: str) -> None:
        """Stores a matplotlib figure as the artifact `name` (e.g. "plots/confusion.png") and closes it."""
        import matplotlib.pyplot as plt

        try:
            self._client.log_figure(self.run_id, fig, name)
        finally:
            plt.close(fig)  # long processes (grids, tuning) would otherwise pile up open figures

    def log_text(self, text: str, name: str) -> None:
        """Stores `text` as the artifact `name`."""
        self._client.log_text(self.run_id, text, name)

    def log_dataset(self, name: str, digest: str, root: str | Path, context: str) -> None:
        """Records a dataset the run used (the UI's Dataset column): its name, content digest, where
        it lives and how it was used ("train", "validation", "test")."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that a path matches both.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(Path(root).resolve()))
        mlflow.log_input(MetaDataset(source, name=name, digest=digest), context=context)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """Stores `data` as a JSON (or YAML, by extension) artifact `name`."""
        self._client.log_dict(self.run_id, data, name)

    def log_torch(self, data: dict[str, Any], name: str) -> None:
        """Stores tensors (a dict of state dicts and plain values) as the artifact `name` (e.g.
        "gkd/state.pt"), readable with `load_run_torch` (weights_only)."""
        import tempfile

        path = Path(name)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / path.name
            torch.save(data, local)
            self._client.log_artifact(self.run_id, str(local), str(path.parent) if str(path.parent) != "." else None)

    # -- models ----------------------------------------------------------------------------

    def log_model(
        self,
        model: torch.nn.Module,
        name: str,
        input_example: np.ndarray,
        registered_name: str | None = None,
    ) -> LoggedModelRef:
        """Logs `model` as a LoggedModel of this run, optionally as a new registry version.

        The model is exported with torch.export on the CPU in eval mode, so it loads on any
        machine and behaves as at evaluation time. `input_example` must hold a batch of at least
        2 so the exported graph keeps the batch size free (other dimensions are fixed).
        The version gets the run's standard tags, which `promote_champion` relies on.
        """
        if input_example.ndim < 1 or input_example.shape[0] < 2:
            raise ValueError(
                f"input_example for model '{name}' has shape {input_example.shape}: give a batch "
                "of at least 2 so the logged model accepts any batch size"
            )
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise TrackingError(
                f"log_model must be called while run {self.run_id} is the innermost open run "
                "in this thread"
            )
        self.flush()
        export = copy.deepcopy(model).to("cpu").eval()
        example = np.ascontiguousarray(input_example, dtype=np.float32)
        with torch.no_grad():
            output = export(torch.from_numpy(example)).numpy()
        run_tags = self._get_run(self.run_id).data.tags
        info = mlflow.pytorch.log_model(
            export,
            name=name,
            input_example=example,
            signature=infer_signature(example, output),
            registered_model_name=registered_name,
            serialization_format="pt2",
            # An exported graph needs only torch to load; letting MLflow infer requirements
            # re-imports the model in a subprocess, which costs ~10 s per model on 2 cores.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            tags={k: run_tags[k] for k in STANDARD_TAGS if k in run_tags},
        )
        version = None
        if registered_name is not None:
            version = str(info.registered_model_version)
            for key in STANDARD_TAGS:
                if key in run_tags:
                    self._client.set_model_version_tag(registered_name, version, key, run_tags[key])
        # The run names its model, so `runs:/<run_id>` (and the grid's teacher lookups) need not
        # know the model's name.
        self._client.set_tag(self.run_id, MODEL_URI_TAG, info.model_uri)
        return LoggedModelRef(
            model_uri=info.model_uri,
            model_id=info.model_id,
            run_id=self.run_id,
            registered_name=registered_name,
            version=version,
        )

    def promote_champion(
        self,
        registered_name: str,
        version: str,
        metric_name: str,
        dataset_fingerprint: str,
        higher_is_better: bool = True,
    ) -> list[str]:
        """Sends pending metrics, then applies `promote_champion` (see there)."""
        self.flush()
        return promote_champion(
            registered_name, version, metric_name, dataset_fingerprint, higher_is_better
        )


def register_model(model_uri: str, registered_name: str, run_id: str) -> str:
    """Registers the logged model at `model_uri` of run `run_id` as a new version of
    `registered_name`, with the run's standard tags; returns the version.

    Raises:
        TrackingError: the run has not ended FINISHED (a killed or failed run registers nothing).
    """
    client = _client()
    run = client.get_run(run_id)
    if run.info.status != RunStatus.to_string(RunStatus.FINISHED):
        raise TrackingError(f"run {run_id} is {run.info.status}: only a FINISHED run's model is registered")
    version = str(mlflow.register_model(model_uri, registered_name).version)
    for key in STANDARD_TAGS:
        if key in run.data.tags:
            client.set_model_version_tag(registered_name, version, key, run.data.tags[key])
    return version


def _status_for(exc: BaseException | None) -> str:
    if exc is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(exc, (RunTerminated, KeyboardInterrupt)):
        return RunStatus.to_string(RunStatus.KILLED)
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return RunStatus.to_string(RunStatus.FINISHED)
    return RunStatus.to_string(RunStatus.FAILED)


def _version_score(client: MlflowClient, name: str, version: str, metric_name: str) -> float | None:
    mv = client.get_model_version(name, version)
    value = client.get_run(mv.run_id).data.metrics.get(metric_name) if mv.run_id else None
    return None if value is None or math.isnan(value) else float(value)


def promote_champion(
    registered_name: str,
    version: str,
    metric_name: str,
    dataset_fingerprint: str,
    higher_is_better: bool = True,
) -> list[str]:
    """Moves champion aliases to `version` when it beats the current holder on the same dataset.

    The rule: scores are only comparable on the same data, so versions compete only with versions
    whose `dataset_fingerprint` tag matches. Each dataset has its own alias
    `champion-<fingerprint>`, which always names the best version for that dataset. The plain
    `champion` alias follows the same rule but stays with its dataset: when it is held by a version
    of another dataset it is left alone (use the per-dataset alias there). A version's score is
    the latest value of `metric_name` on the run that logged it; a holder without that metric
    loses; ties keep the holder.

    Returns:
        The aliases that point at `version` after the call because of it (empty if it lost).

    Raises:
        TrackingError: the version is unknown, trained on another dataset, or lacks the metric.
    """
    client = _client()
    version = str(version)
    try:
        candidate = client.get_model_version(registered_name, version)
    except MlflowException as exc:
        raise TrackingError(
            f"registered model '{registered_name}' has no version {version}"
        ) from exc
    fingerprint = candidate.tags.get("dataset_fingerprint")
    if fingerprint != dataset_fingerprint:
        raise TrackingError(
            f"version {version} of '{registered_name}' is tagged dataset_fingerprint="
            f"{fingerprint}, not {dataset_fingerprint}: promote it for the dataset it was trained on"
        )
    score = _version_score(client, registered_name, version, metric_name)
    if score is None:
        raise TrackingError(
            f"the run of version {version} of '{registered_name}' has no metric '{metric_name}'"
        )
    aliases = client.get_registered_model(registered_name).aliases
    moved = []
    for alias in (f"{CHAMPION}-{dataset_fingerprint}", CHAMPION):
        holder = aliases.get(alias)
        if holder is not None and str(holder) != version:
            holder_mv = client.get_model_version(registered_name, str(holder))
            if holder_mv.tags.get("dataset_fingerprint") != dataset_fingerprint:
                continue
            best = _version_score(client, registered_name, str(holder), metric_name)
            if best is not None and not (score > best if higher_is_better else score < best):
                continue
        client.set_registered_model_alias(registered_name, alias, version)
        moved.append(alias)
    # The registry shows the score each version competed with, and whether it won.
    client.set_model_version_tag(registered_name, version, metric_name, f"{score:.4f}")
    verdict = f"champion ({', '.join(moved)})" if moved else "not champion"
    client.update_model_version(registered_name, version, description=(
        f"{metric_name} {score:.4f} on dataset {dataset_fingerprint}: {verdict} when registered"))
    return moved


# -- reading back ---------------------------------------------------------------------------


def find_runs(
    experiment: str,
    filter_string: str = "",
    order_by: list[str] | None = None,
    max_results: int | None = None,
) -> list[dict[str, Any]]:
    """Searches an experiment's runs (MLflow filter syntax, e.g. "tags.role = 'teacher'").

    Returns:
        One dict per run: run_id, run_name, status, start_time, end_time (ms), params, metrics,
        tags. An experiment that does not exist has no runs.
    """
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs: list[dict[str, Any]] = []
    page_token = None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=min(max_results or 1000, 1000),
            order_by=order_by,
            page_token=page_token,
        )
        for run in page:
            runs.append(
                {
                    "run_id": run.info.run_id,
                    "run_name": run.info.run_name,
                    "status": run.info.status,
                    "start_time": run.info.start_time,
                    "end_time": run.info.end_time,
                    "params": dict(run.data.params),
                    "metrics": dict(run.data.metrics),
                    "tags": dict(run.data.tags),
                }
            )
        page_token = page.token
        if not page_token or (max_results is not None and len(runs) >= max_results):
            return runs[:max_results] if max_results is not None else runs


class ExportedModel(torch.nn.Module):
    """A logged model loaded back: an inference graph wrapped as an ordinary module.

    The graph was exported in eval mode, so dropout and batch norm are fixed at their evaluation
    behaviour; `train()`/`eval()` only flip the flag (exported graphs reject them), which lets
    callers freeze a loaded teacher the usual way.
    """

    def __init__(self, graph: torch.nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self


MODEL_URI_TAG = "model_uri"  # set on a run by `log_model`: the models:/ URI of the run's model


def model_name(run_name: str) -> str:
    """The name a run's logged model gets: its run name in the characters MLflow allows there (no
    '.', '/', ':'), e.g. kd-c3d→r3d_18-f0.25-s0 -> kd-c3d-to-r3d_18-f0_25-s0, so the UI's model lists
    say what each model is."""
    name = run_name.replace("→", "-to-").replace(".", "_")
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "model"


def resolve_model_uri(uri: str) -> str:
    """`runs:/<run_id>` (no model name) -> the models:/ URI of that run's logged model; any other URI
    is returned unchanged."""
    if not uri.startswith("runs:/") or uri[len("runs:/") :].strip("/").count("/"):
        return uri
    run_id = uri[len("runs:/") :].strip("/")
    try:
        tags = _client().get_run(run_id).data.tags
    except MlflowException as exc:
        raise TrackingError(f"{uri}: no run {run_id} at {tracking_uri()}") from exc
    if MODEL_URI_TAG not in tags:
        raise TrackingError(f"{uri}: run {run_id} logged no kdhar model (no '{MODEL_URI_TAG}' tag); "
                            "give the model's full URI, runs:/<run_id>/<model name>")
    return tags[MODEL_URI_TAG]


def load_model(uri: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Loads a model logged by `RunTracker.log_model` onto `device`.

    Args:
        uri: `models:/<name>@<alias>`, `models:/<name>/<version>`, `models:/<model_id>`,
            `runs:/<run_id>/<name>` or `runs:/<run_id>` (the run's logged model).
        device: where the weights should live.
    """
    check_server(tracking_uri())
    uri = resolve_model_uri(uri)
    device = torch.device(device)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    archive = safe_model_archive(uri, local)
    with _pickle_refused():
        # With pickle refused, MLflow checks every record of the archive is a plain tensor or
        # text before torch.export loads it.
        try:
            graph = mlflow.pytorch.load_model(str(local))
        except MlflowException as exc:
            if "pickle is disallowed" not in exc.message:
                raise
            raise TrackingError(f"{uri}: its torch.export archive holds pickled objects, which could run "
                                f"code when loaded: refusing to load it; {RELOG_HINT}") from exc
        if device.type != "cpu":
            # Exported graphs cannot be moved with .to(); the program is re-targeted instead.
            from torch.export.passes import move_to_device_pass

            program = torch.export.load(str(archive))
            graph = move_to_device_pass(program, device).module()
    return ExportedModel(graph)


PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
RELOG_HINT = ("re-log it with mlflow.pytorch.log_model(..., serialization_format='pt2') "
              "(as kdhar's RunTracker.log_model does) or train it with kdhar")
_pickle_env_lock = threading.Lock()


@contextlib.contextmanager
def _pickle_refused() -> Iterator[None]:
    """Turns MLflow's pickle deserialisation off while a model loads, whatever the environment says:
    unpickling a model runs whatever code its author put in it."""
    with _pickle_env_lock:
        before = os.environ.get(PICKLE_ENV)
        os.environ[PICKLE_ENV] = "false"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(PICKLE_ENV, None)
            else:
                os.environ[PICKLE_ENV] = before


def safe_model_archive(uri: str, local: Path) -> Path:
    """The torch.export archive of the downloaded model at `local`, after checking from its MLmodel
    and files that loading it runs no code of the model's author.

    Raises:
        TrackingError: the model is pickle-serialised, ships code, or is no PyTorch model.
    """
    from mlflow.models import Model

    try:
        flavor = Model.load(str(local)).flavors.get("pytorch")
    except MlflowException as exc:
        raise TrackingError(f"{uri} is not an MLflow model (no readable MLmodel file)") from exc
    if flavor is None:
        raise TrackingError(f"{uri} is not a PyTorch model (its MLmodel has no 'pytorch' flavor)")
    if flavor.get("code"):
        raise TrackingError(f"{uri} ships Python code ('{flavor['code']}') that loading would import; "
                            f"refusing to run it: {RELOG_HINT}")
    data = local / flavor.get("model_data", "data")
    if (data / "model.pth").exists() or (data / "pickle_module_info.txt").exists():
        raise TrackingError(f"{uri} is pickle-serialised, and unpickling a model runs any code its author "
                            f"put in it: refusing to load it; {RELOG_HINT}")
    archive = data / "model.pt2"
    if not archive.is_file():
        raise TrackingError(f"{uri} holds no torch.export archive ({archive.name}): {RELOG_HINT}")
    return archive



# -- small helpers on existing runs and models --------------------------------------------------


def experiments_with_runs(filter_string: str) -> list[str]:
    """Names of the active experiments holding at least one active run that matches `filter_string`."""
    client = _client()
    names = []
    for exp in client.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        if client.search_runs([exp.experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1):
            names.append(exp.name)
    return sorted(names)


def experiment_exists(name: str) -> bool:
    """Whether an active experiment called `name` exists in the tracking store."""
    exp = _client().get_experiment_by_name(name)
    return exp is not None and exp.lifecycle_stage == "active"


def run_status(run_id: str) -> str:
    """The run's status: RUNNING, FINISHED, FAILED, KILLED or SCHEDULED."""
    return _client().get_run(run_id).info.status


def run_tags(run_id: str) -> dict[str, str]:
    """All tags of a run, MLflow's own `mlflow.*` ones included."""
    return dict(_client().get_run(run_id).data.tags)


def run_params(run_id: str) -> dict[str, str]:
    """A run's params, as the strings MLflow stores."""
    return dict(_client().get_run(run_id).data.params)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """Every logged (step, value) of one metric, by step; the latest value wins within a step."""
    points = sorted(_client().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return sorted({m.step: m.value for m in points}.items())


def load_run_dict(run_id: str, name: str) -> dict[str, Any]:
    """Reads back a JSON/YAML artifact stored with `RunTracker.log_dict`."""
    _client()
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{name}")


def load_run_torch(run_id: str, name: str) -> dict[str, Any] | None:
    """Reads back an artifact stored with `RunTracker.log_torch`; None when the run has none."""
    import tempfile

    client = _client()
    parent = str(Path(name).parent) if str(Path(name).parent) != "." else None
    if not any(Path(f.path).name == Path(name).name for f in client.list_artifacts(run_id, parent)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp)
        return torch.load(local, map_location="cpu", weights_only=True)


def log_metrics_to(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Adds metrics to an existing (possibly ended) run, synchronously, without re-opening it."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    _client().log_batch(run_id, metrics=items)


def release_project_run(tags: dict[str, str], name: str | None = None, description: str | None = None) -> str | None:
    """Under `mlflow run`, names and tags the project's run (MLFLOW_RUN_ID) as the umbrella of a
    multi-run command and stops later runs from adopting it: each run of a grid or demo is its own run.

    Returns:
        The project run's id, or None outside `mlflow run`.
    """
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id:
        client = _client()
        tags = {**tags, **({"mlflow.note.content": description} if description else {})}
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        if name:
            client.update_run(run_id, name=name)
    return run_id


def create_claim(experiment: str, key: str, name: str, tags: dict[str, str]) -> str:
    """A marker run (tag role=claim, claim=key) saying that a grid runner is training the cell `key`;
    `delete_run` removes it (deleted runs are hidden from the UI and from `find_runs`)."""
    client = _client()
    exp_id = _get_or_create_experiment(client, experiment)
    run = client.create_run(exp_id, run_name=name[:250], tags={"role": "claim", "claim": key, **tags})
    return run.info.run_id


def delete_run(run_id: str) -> None:
    _client().delete_run(run_id)


def end_run_as(run_id: str, status: str) -> None:
    """Sets a run's final status (FINISHED, FAILED or KILLED), e.g. for a run whose process died."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
    _client().set_terminated(run_id, status=status)


def model_run_id(uri: str) -> str:
    """The id of the run that logged the model at `uri` (models:/ or runs:/ forms, as load_model)."""
    client = _client()
    if uri.startswith("runs:/"):
        return uri[len("runs:/") :].split("/", 1)[0]
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: expected a models:/ or runs:/ URI")
    ref = uri[len("models:/") :].rstrip("/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            return client.get_model_version(name, version).run_id
        return client.get_logged_model(ref).source_run_id
    except MlflowException as exc:
        raise TrackingError(f"{uri} does not name a logged model at {tracking_uri()}") from exc


def champion_uri(registered_name: str, dataset_fingerprint: str) -> str | None:
    """`models:/<name>@champion-<fingerprint>` when that dataset has a champion, else None."""
    alias = f"{CHAMPION}-{dataset_fingerprint}"
    try:
        aliases = _client().get_registered_model(registered_name).aliases
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return None  # nothing registered under this name yet
    return f"models:/{registered_name}@{alias}" if alias in aliases else None
