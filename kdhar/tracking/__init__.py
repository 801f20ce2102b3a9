"""Experiment tracking: the only package that imports mlflow.

One concern per module; every name is re-exported here, so callers write `tracking.find_runs(...)`:

    store.py     where runs go (`tracking_uri`) and whether that store works (`check_server`,
                 `check_store`, the SQLite open lock, `mask_uri`); `TrackingError`
    tags.py      the standard tags every run carries (`standard_tags`, `git_commit`)
    project.py   the experiment a run is filed under, and `mlflow run`'s project run
    tracker.py   `RunTracker`: the run this process is running, its end status and signals
    sender.py    the thread that sends a run's per-step metrics in batches
    liveness.py  whether a RUNNING run's or a claim's process is alive: pid tags, heartbeats, claims
    runs.py      runs that exist: `find_runs`, `run_status`, `run_tags`, `end_run_as`, ...
    models.py    logging models as `pt2` and loading them back without running their author's code
    registry.py  `register_model` and the champion aliases (`promote_champion`, `champion_uri`)

Imports point one way: `store` and `tags` import no other module here; `tracker` is on top.
"""

from kdhar.tracking.liveness import (
    HEARTBEAT_S,
    HEARTBEAT_TAG,
    PID_STARTED_TAG,
    STALE_S,
    Heartbeat,
    create_claim,
    process_alive,
    process_start,
    process_tags,
    seems_dead,
    stale_after,
    stamp_process_start,
)
from kdhar.tracking.models import (
    MODEL_URI_TAG,
    PICKLE_ENV,
    RELOG_HINT,
    ExportedModel,
    LoggedModelRef,
    load_model,
    log_run_model,
    model_name,
    model_run_id,
    resolve_model_uri,
    safe_model_archive,
)
from kdhar.tracking.project import (
    DEFAULT_EXPERIMENT,
    ExperimentMismatchError,
    check_project_experiment,
    get_or_create_experiment,
    project_experiment,
    project_run_id,
    release_project_run,
    resolve_experiment,
)
from kdhar.tracking.registry import CHAMPION, champion_uri, promote_champion, register_model, tag_version
from kdhar.tracking.runs import (
    delete_run,
    end_run_as,
    experiment_exists,
    experiments_with_runs,
    find_runs,
    load_run_dict,
    load_run_torch,
    log_metrics_to,
    metric_history,
    run_params,
    run_status,
    run_tags,
)
from kdhar.tracking.store import (  # _client stays importable here: tests open a store through it
    DB_SCHEMES,
    TrackingError,
    TrackingUnavailableError,
    _client,
    check_server,
    check_store,
    is_bad_reference,
    mask_uri,
    tracking_uri,
    use_tracking_uri,
)
from kdhar.tracking.sender import MetricSender
from kdhar.tracking.tags import STANDARD_TAGS, git_commit, standard_tags
from kdhar.tracking.tracker import RunTerminated, RunTracker

__all__ = [
    "CHAMPION", "DB_SCHEMES", "DEFAULT_EXPERIMENT", "HEARTBEAT_S", "HEARTBEAT_TAG", "MODEL_URI_TAG", "PICKLE_ENV",
    "PID_STARTED_TAG", "RELOG_HINT", "STALE_S", "STANDARD_TAGS",
    "ExperimentMismatchError", "ExportedModel", "Heartbeat", "LoggedModelRef", "MetricSender", "RunTerminated", "RunTracker",
    "TrackingError", "TrackingUnavailableError",
    "check_project_experiment", "check_server", "check_store", "champion_uri", "create_claim",
    "delete_run", "end_run_as", "experiment_exists", "experiments_with_runs", "find_runs", "get_or_create_experiment", "git_commit",
    "is_bad_reference", "load_model", "load_run_dict", "load_run_torch", "log_metrics_to", "log_run_model",
    "mask_uri", "metric_history", "model_name", "model_run_id", "process_alive", "process_start", "process_tags",
    "project_experiment", "project_run_id", "promote_champion", "register_model", "release_project_run",
    "resolve_experiment", "resolve_model_uri", "run_params", "run_status", "run_tags", "safe_model_archive",
    "seems_dead", "stale_after", "stamp_process_start", "standard_tags", "tag_version", "tracking_uri",
    "use_tracking_uri",
]
