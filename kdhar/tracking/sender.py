"""The background thread that sends a run's per-step metrics in batches, so training never waits on the
network."""

from __future__ import annotations

import queue
import threading
from typing import Any

from mlflow import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from kdhar.tracking.store import TrackingError


class MetricSender(threading.Thread):
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
