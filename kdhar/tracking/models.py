"""Logged models: exporting a run's model in the `pt2` (torch.export) format, which loads without
unpickling code, finding a model from a URI, and loading one back after checking it runs no code."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from kdhar.disk import DiskFullError, disk_full
from kdhar.tracking.registry import tag_version
from kdhar.tracking.store import TrackingError, _client, check_server, full_disk_at, tracking_uri
from kdhar.tracking.tags import STANDARD_TAGS

MODEL_URI_TAG = "model_uri"  # set on a run by `log_model`: the models:/ URI of the run's model


@dataclass(frozen=True)
class LoggedModelRef:
    """Where a logged model lives: `model_uri` loads it, `version` is set when it was registered."""

    model_uri: str
    model_id: str
    run_id: str
    registered_name: str | None = None
    version: str | None = None


def log_run_model(
    client: MlflowClient,
    run_id: str,
    model: torch.nn.Module,
    name: str,
    input_example: np.ndarray,
    registered_name: str | None = None,
    run_model: bool = True,
) -> LoggedModelRef:
    """Logs `model` as a LoggedModel of run `run_id`, optionally as a new registry version.

    The model is exported with torch.export on the CPU in eval mode, so it loads on any
    machine and behaves as at evaluation time. `input_example` must hold a batch of at least
    2 so the exported graph keeps the batch size free (other dimensions are fixed).
    The version gets the run's standard tags, which `promote_champion` relies on. `run_model`
    makes it the run's own model (`runs:/<run_id>` resolves to it); off for a model the run keeps
    beside it (a stage's, `runs:/<run_id>/<name>`).

    Raises:
        TrackingError: `run_id` is not the innermost run open in this thread (MLflow logs there).
    """
    if input_example.ndim < 1 or input_example.shape[0] < 2:
        raise ValueError(
            f"input_example for model '{name}' has shape {input_example.shape}: give a batch "
            "of at least 2 so the logged model accepts any batch size"
        )
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise TrackingError(
            f"log_model must be called while run {run_id} is the innermost open run "
            "in this thread"
        )
    export = copy.deepcopy(model).to("cpu").eval()
    example = np.ascontiguousarray(input_example, dtype=np.float32)
    with torch.no_grad():
        output = export(torch.from_numpy(example)).numpy()
    run_tags = client.get_run(run_id).data.tags
    try:
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
    except Exception as exc:
        if not disk_full(exc):
            raise
        removed = _remove_unfinished_models(client, run_id)
        raise DiskFullError(f"disk full at {full_disk_at(exc)}: the model of run {run_id} was not logged"
                            f"{' (its partial files were removed)' if removed else ''}; free space there and run "
                            "the command again") from exc
    version = None
    if registered_name is not None:
        version = str(info.registered_model_version)
        tag_version(client, registered_name, version, run_tags)
    # The run names its model, so `runs:/<run_id>` (and the grid's teacher lookups) need not
    # know the model's name.
    if run_model:
        client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    return LoggedModelRef(
        model_uri=info.model_uri,
        model_id=info.model_id,
        run_id=run_id,
        registered_name=registered_name,
        version=version,
    )


def _remove_unfinished_models(client: MlflowClient, run_id: str) -> bool:
    """Deletes the files of the run's logged models that never became READY, where they lie on this
    machine: a copy cut short by a full disk is of no use, and the space it holds may be what the
    store needs to end the run. Returns whether any were removed."""
    import shutil

    from mlflow.entities import LoggedModelStatus
    from mlflow.utils.file_utils import local_file_uri_to_path

    experiment_id = client.get_run(run_id).info.experiment_id
    removed = False
    for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        location = model.artifact_location or ""
        remote = "://" in location and not location.startswith("file://")
        if model.status == LoggedModelStatus.READY or remote:
            continue
        folder = Path(local_file_uri_to_path(location))
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed = True
    return removed


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
