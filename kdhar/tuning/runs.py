"""The MLflow side of a study: its parent run, the tags that link a trial's run to it, a worker's
run under `mlflow run`, and the best values and plots logged on the parent."""

from __future__ import annotations

import os
import warnings
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from kdhar import tracking
from kdhar.tuning.space import OBJECTIVE


# Tags that link an MLflow run to its study and trial.
TAG_STUDY = "optuna_study"
TAG_TRIAL = "optuna_trial_number"
TAG_STATE = "optuna_state"
TAG_RETRY_OF = "optuna_retry_of"


def create_parent(experiment: str, name: str, params: dict[str, Any]) -> str:
    """Starts and ends the study's parent run, its params and a description on it; returns its id."""
    teacher = str(params.get("teacher", ""))
    how = "trained from scratch" if teacher.lower() == "none" else f"distilled from {teacher}"
    seeds = int(params.get("val_seeds", 1))
    over = f"the mean over {seeds} seeds of the best {OBJECTIVE}" if seeds > 1 else OBJECTIVE
    description = (f"Optuna study '{name}': tunes {params.get('search_space', '')} of {params.get('student', '')} "
                   f"{how}, maximising {over} on the validation split. "
                   "Each trial is a child run (trial-N); the best value and the study's plots are logged here.")
    tags = {TAG_STUDY: name, "role": "tuning", "mlflow.note.content": description}
    with tracking.RunTracker(experiment, run_name=f"tune-{name}", tags=tags) as run:
        run.log_params(params)
        return run.run_id


def absorb_project_run(experiment: str, study_name: str, parent_id: str) -> None:
    """Under `mlflow run`, MLflow hands its own run over in MLFLOW_RUN_ID and the next new run
    silently becomes it. The worker that creates the study uses it as the parent; any other worker
    would turn it into a trial run outside the study, so record it as a worker run under the parent."""
    project_run = os.environ.get("MLFLOW_RUN_ID")
    if not project_run or project_run == parent_id:
        return
    tags = {TAG_STUDY: study_name, "role": "tuning-worker", "mlflow.parentRunId": parent_id,
            "mlflow.note.content": f"A worker that joined the Optuna study '{study_name}'; its trials are under tune-{study_name}."}
    with tracking.RunTracker(experiment, run_name=f"worker-{study_name}", tags=tags):
        pass


def trial_run_ids(experiment: str, study_name: str, number: int) -> list[str]:
    """The MLflow runs tagged as trial `number` of the study (a killed worker never recorded its id)."""
    found = tracking.find_runs(experiment, f"tags.{TAG_STUDY} = '{study_name}' and tags.{TAG_TRIAL} = '{number}'")
    return [r["run_id"] for r in found]


def tag_run(experiment: str, run_id: str, tags: dict[str, str], status: str | None = None) -> None:
    """Sets tags on an ended run by re-opening it, then leaves it with `status` (default FINISHED)."""
    with tracking.RunTracker(experiment, resume_run_id=run_id) as run:
        run.set_tags(tags)
    if status is not None and status != "FINISHED":
        tracking.end_run_as(run_id, status)


def log_study_to_parent(
    study: optuna.Study, parent_id: str, experiment: str, summary: dict[str, Any], plots: bool
) -> None:
    """Best values and, when `plots`, the study's plots on the parent run (each worker that ran
    trials refreshes them when it finishes)."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = summary["complete"]
    with tracking.RunTracker(experiment, resume_run_id=parent_id) as run:
        metrics = {"n_complete": complete, "n_pruned": summary["pruned"], "n_failed": summary["failed"],
                   "epochs_total": summary["epochs"]}
        if summary["best_params"]:
            metrics.update({f"best_{k}": v for k, v in summary["best_params"].items()})
            metrics[f"best_{OBJECTIVE}"] = summary["best_value"]
            run.set_tags({"best_trial": str(summary["best_trial"])})
        run.log_metrics(metrics, step=len(study.trials))
        if complete == 0 or not plots:
            return
        names = list(summary["best_params"] or [])
        figures = {"optimization_history.png": lambda: ovm.plot_optimization_history(study),
                   "slice.png": lambda: ovm.plot_slice(study, params=names)}
        notes = []
        if complete >= 2 and len(names) >= 2:
            figures["contour.png"] = lambda: ovm.plot_contour(study, params=names[:2])
            figures["param_importances.png"] = lambda: ovm.plot_param_importances(study)
        else:
            notes.append("parameter importances and the contour need at least 2 complete trials of 2+ parameters")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            for name, plot in figures.items():
                ax = plot()
                fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
                run.log_figure(fig, f"optuna/{name}")
                plt.close(fig)
        run.log_dict({"summary": {k: v for k, v in summary.items() if k != "dashboard"}, "notes": notes},
                     "optuna/summary.json")
