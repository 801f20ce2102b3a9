"""The experiment a run is filed under, and the run `mlflow run` opened for this command (the project
run), which kdhar's run adopts or, for a command of many runs, names as their umbrella."""

from __future__ import annotations

import os

from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from kdhar.tracking.store import TrackingError, _client


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of the active experiment `name`, created when missing.

    Raises:
        TrackingError: the experiment is deleted (the message says how to restore it).
    """
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
