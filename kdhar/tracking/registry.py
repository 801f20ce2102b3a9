"""The model registry: registering a run's model, and the champion aliases, moved by score on the same
dataset only."""

from __future__ import annotations

import math

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from kdhar.tracking.store import TrackingError, _client
from kdhar.tracking.tags import STANDARD_TAGS

CHAMPION = "champion"


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
    tag_version(client, registered_name, version, run.data.tags)
    return version


def tag_version(client: MlflowClient, registered_name: str, version: str, run_tags: dict[str, str]) -> None:
    """Copies the run's standard tags onto its registered version, so the registry says what the version
    is (method, teacher, data share, seed) and `promote_champion` can compare it on its dataset."""
    for key in STANDARD_TAGS:
        if key in run_tags:
            client.set_model_version_tag(registered_name, version, key, run_tags[key])


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
