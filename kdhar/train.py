"""One training run, end to end: every entry point (train_teacher, distill, finetune, each tuning
trial, each grid cell) goes through `run_training`, so they all log, checkpoint and resume the same way.

The run's parts live in `kdhar.training`: prepare -> epoch loop -> listeners. The names below are
re-exported so callers keep one import for a run and its helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kdhar.checkpoint import load_checkpoint
from kdhar.config import RunConfig
from kdhar.disk import DiskFullError
from kdhar.objectives import Objective, Teacher
from kdhar.training.identity import (HASH_NEUTRAL, config_hash, default_run_name, describe_run, open_tracker,
                                     registered_name)
from kdhar.training.listeners import listeners_for
from kdhar.training.listeners.records import EpochClock, clock_text
from kdhar.training.listeners.checkpoints import BEST_METRIC, checkpoint_dir
from kdhar.training.listeners.outcome import CHAMPION_METRIC
from kdhar.training.listeners.scores import STAGES, plateau_loss, stage_epochs
from kdhar.training.loop import EpochLoop, StopTraining
from kdhar.training.prepare import (EVAL_REPLAY_BYTES, TRAIN_FRAME_CACHE_BYTES, TrainingView, pick_device,
                                    prepare)
from kdhar.training.resume import (INIT_MIN_SHARE, RESUME_ALLOWED, RESUME_FREE, ResumeError, check_resume,
                                   load_compatible, load_init_weights)
from kdhar.training.splits import Splits, check_same_classes, load_splits

__all__ = [
    "BEST_METRIC", "CHAMPION_METRIC", "EVAL_REPLAY_BYTES", "EpochClock", "HASH_NEUTRAL", "INIT_MIN_SHARE", "RESUME_ALLOWED", "RESUME_FREE", "STAGES",
    "TRAIN_FRAME_CACHE_BYTES", "ResumeError", "RunResult", "Splits", "StopTraining", "Teacher", "TrainingView",
    "check_resume", "check_same_classes", "checkpoint_dir", "clock_text", "config_hash", "load_init_weights", "default_run_name", "describe_run", "load_compatible",
    "load_splits", "pick_device", "plateau_loss", "registered_name", "run_training", "stage_epochs",
]


@dataclass
class RunResult:
    run_id: str
    final: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: str | None = None
    model_uri: str | None = None


def run_training(
    cfg: RunConfig,
    *,
    role: str,
    experiment: str,
    init_state: dict[str, torch.Tensor] | None = None,
    init: str | None = None,
    run_name: str | None = None,
    resume: str | None = None,
    allow_config_change: bool = False,
    workdir: str | Path = "runs",
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
    register: bool = True,
    objective: Objective | None = None,
    device: str | None = None,
    progress: bool = True,
    stage_models: bool | None = None,
) -> RunResult:
    """Trains one model and logs everything to the tracking store.

    Args:
        cfg: the run's configuration.
        role: "teacher", "student" or "finetune"; a tag used by reports and teacher lookup.
        experiment: MLflow experiment name.
        objective: what the run optimises (`kdhar.objectives.build_objective`); None is plain
            supervised training.
        init_state: weights to start from (classifier weights of a different shape are skipped); refused
            when they fill less than INIT_MIN_SHARE of the model (see `load_init_weights`).
        init: where `init_state` came from (the --init URI or path): recorded as param and tag `init`,
            and the run's default name starts with "init-".
        resume: a checkpoint path to continue from; the same MLflow run is re-opened. The
            checkpoint's configuration must match `cfg` (see `check_resume`).
        allow_config_change: let a resumed run change the RESUME_ALLOWED knobs (tagged on the run).
        epoch_callback: called after each epoch with its metrics; may raise StopTraining.
        stage_models: also log the model of each paper stage before the last epoch, as the run's
            model `model-early` / `model-mid` (`runs:/<run id>/model-early`); None: for PCL runs only,
            the others stay light (each is one more exported model in the store).

    Under torchrun (WORLD_SIZE > 1) the run is data-parallel (`kdhar.distributed`): every rank
    trains its share of each global batch, rank 0 alone tracks, evaluates, checkpoints and
    registers, and a job torchrun restarts (--max-restarts) resumes from rank 0's last checkpoint.
    """
    prep = prepare(cfg, role=role, objective=objective, init_state=init_state, init=init, resume=resume,
                   allow_config_change=allow_config_change, workdir=workdir, device=device, progress=progress)
    if stage_models is None:
        stage_models = cfg.pcl.ssl == "pcl"
    listeners = listeners_for(prep, workdir=workdir, register=register, epoch_callback=epoch_callback,
                              stage_models=stage_models)
    tracker = open_tracker(prep, experiment, run_name, parent_run_id, tags)
    try:
        run = EpochLoop(prep, listeners).run(tracker)
    except DiskFullError as exc:
        raise with_resume_hint(exc, Path(workdir) / "checkpoints" / tracker.run_id / "last.pt") from exc.__cause__
    return RunResult(run_id=run.run_id, final=run.final, history=run.history, stopped=run.stopped,
                     model_uri=run.model_uri)


def with_resume_hint(exc: DiskFullError, checkpoint: Path) -> DiskFullError:
    """A full disk's line, plus the checkpoint the run continues from once space is freed (the
    tracker that ended the run does not know it); unchanged when it names one already or none exists."""
    if "--resume" in str(exc) or not checkpoint.is_file():
        return exc
    epoch = load_checkpoint(checkpoint)["epoch"]
    return type(exc)(f"{str(exc).rstrip('.')}; to continue it from epoch {epoch}, add --resume {checkpoint}")
