"""Runs that exist already: finding them, reading back their status, tags, params, metrics and
artifacts, adding metrics, ending or deleting them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric, ViewType

from kdhar.tracking.store import _client


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


def delete_run(run_id: str) -> None:
    _client().delete_run(run_id)


def end_run_as(run_id: str, status: str) -> None:
    """Sets a run's final status (FINISHED, FAILED or KILLED), e.g. for a run whose process died."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
    _client().set_terminated(run_id, status=status)
