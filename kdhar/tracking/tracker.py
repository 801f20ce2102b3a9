"""`RunTracker`: the one MLflow run this process is running, opened as a context manager.

Per-step metrics are queued and sent in batches by a background thread so the training loop never
waits on the network; everything else (params, tags, artifacts, models) is sent at once. A run always
ends with a final status: FINISHED, FAILED when its body raised, KILLED when it was interrupted by
SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from kdhar.disk import DiskFullError, disk_full
from kdhar.tracking.liveness import Heartbeat, stamp_process_start
from kdhar.tracking.models import LoggedModelRef, log_run_model
from kdhar.tracking.project import get_or_create_experiment, check_project_experiment, project_run_id
from kdhar.tracking.registry import promote_champion
from kdhar.tracking.sender import MetricSender
from kdhar.tracking.store import TrackingError, _client, full_disk_at, tracking_uri

logger = logging.getLogger(__name__)


class RunTerminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives during a run.

    It derives from SystemExit so an uncaught one exits quietly with the shell's usual
    128 + signal code, after the run has been ended as KILLED.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        # The server rejects longer values; the full dict is kept as an artifact by log_params.
        text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return text


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
        self._sender: MetricSender | None = None
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
        experiment_id = get_or_create_experiment(self._client, self.experiment)
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
        self._sender = MetricSender(self._client, self.run_id)
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
        failure = exc if exc is not None else flush_error
        try:
            self._end(status)
        except Exception as end_error:
            raise self._not_ended(failure, end_error) from (failure or end_error)
        finally:
            self._restore_signal_handlers()
        if failure is not None and disk_full(failure) and not isinstance(failure, DiskFullError):
            # Said in one line with where and what to do, not as SQLite's or the copy's chain of tracebacks.
            raise DiskFullError(f"disk full at {full_disk_at(failure)}: run {self.run_id} ended {status}; free "
                                "space there and run the command again") from failure
        if isinstance(failure, DiskFullError) and f"run {self.run_id}" not in str(failure):
            # The body's own line (a checkpoint not written, say) names what was lost; add which run ended how.
            raise type(failure)(f"{str(failure).rstrip('.')}; run {self.run_id} ended {status}") from failure
        if flush_error is not None:
            if exc is None:
                raise flush_error
            if not disk_full(exc):  # a full disk is the body's own error already; otherwise keep the lost metrics visible
                logger.error("%s (run %s ended %s)", flush_error, self.run_id, status)
        if exc is None and self._signal is not None:
            raise RunTerminated(self._signal)

    def _end(self, status: str) -> None:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)
        else:
            self._client.set_terminated(self.run_id, status=status)

    def _not_ended(self, failure: BaseException | None, end_error: Exception) -> TrackingError | DiskFullError:
        """The one-line error for a run whose final status could not be written (its store is on a full
        disk, or gone): it stays RUNNING, so the line says how it gets ended once the store works."""
        full = disk_full(end_error) is not None
        reason = f"disk full at {full_disk_at(end_error)}" if full else str(end_error).strip().split("\n")[0][:200]
        fix = (f"`kdhar runs reconcile --experiment {self.experiment}` ends it" if "pid" in self.tags
               else "end it in the MLflow UI")
        text = (f"run {self.run_id} could not be ended and stays RUNNING ({reason}); once the tracking store can be "
                f"written again{' (free space)' if full else ''}, {fix}")
        if isinstance(failure, DiskFullError):  # the body's own line says what else was lost, and where
            text = f"{str(failure).rstrip('.')}; and {text}"
        return DiskFullError(text) if full or disk_full(failure) else TrackingError(text)

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
        run_model: bool = True,
    ) -> LoggedModelRef:
        """Sends pending metrics, then logs `model` as a LoggedModel of this run (see `log_run_model`)."""
        self.flush()
        return log_run_model(self._client, self.run_id, model, name, input_example, registered_name, run_model)

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


def _status_for(exc: BaseException | None) -> str:
    if exc is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(exc, (RunTerminated, KeyboardInterrupt)):
        return RunStatus.to_string(RunStatus.KILLED)
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return RunStatus.to_string(RunStatus.FINISHED)
    return RunStatus.to_string(RunStatus.FAILED)
