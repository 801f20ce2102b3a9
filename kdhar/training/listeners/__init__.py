"""What happens around the epoch loop, one listener per concern; `listeners_for` puts them in order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kdhar.training.listeners.checkpoints import Checkpointer
from kdhar.training.listeners.outcome import FinalReport, LoggedModel, ObjectiveMetrics, Registry
from kdhar.training.listeners.records import EpochCallback, MetricLogger, ProgressPrinter, RunRecord
from kdhar.training.listeners.scores import (AttentionHealth, Evaluation, ObjectiveValidation, PlateauSchedule,
                                             ShareMetrics, StageAccuracy, StuckWatch)
from kdhar.training.listeners.stages import StageModels, StageRetrieval
from kdhar.training.loop import Listener
from kdhar.training.prepare import Prepared


def listeners_for(prep: Prepared, *, workdir: str | Path, register: bool,
                  epoch_callback: Callable[[int, dict[str, float]], None] | None,
                  stage_models: bool = False) -> list[Listener]:
    """The listeners of one run, in the order each event reaches them. Under torchrun, rank 0 alone
    scores, checkpoints, logs the model and registers; every rank steps the plateau schedule and
    calls the epoch callback on rank 0's metrics, so all stop together. `stage_models`: also log
    each stage's model (`StageModels`)."""
    main, objective, epochs = prep.main, prep.objective, prep.cfg.optim.epochs
    around_epochs = [
        *([RunRecord()] if main else []),
        # every run with labels; label-free pretraining scores a pretext task of its own
        *([StuckWatch(prep.cfg.optim.epochs, objective.soft_term)] if objective.labels else []),
        *([AttentionHealth()] if hasattr(prep.step, "attention_std") else []),
        *([Evaluation()] if main else []),
        *([ObjectiveValidation()] if main and prep.val_loader is not None else []),
        *([ShareMetrics()] if prep.ddp is not None else []),
        *([PlateauSchedule(prep.optimisers.plateau, objective.plateau_metric)] if prep.optimisers.plateau else []),
        StageAccuracy(prep.cfg.optim.epochs, objective.selection_metric, prep.evaluation.headline,
                      prep.evaluation.stage_prefix),
        *([ProgressPrinter()] if prep.progress else []),
        MetricLogger(),
        *([Checkpointer(workdir, objective.selection_metric, f"val_{prep.evaluation.headline}")] if main else []),
        *([EpochCallback(epoch_callback)] if epoch_callback is not None else []),
    ]
    outcome = [
        *([ObjectiveMetrics(), StageRetrieval(epochs)] if objective.final_metrics else []),
        FinalReport(),
        LoggedModel(),
        *([StageModels(epochs)] if stage_models else []),
        *([Registry()] if register else []),
    ]
    return around_epochs + (outcome if main else [])
