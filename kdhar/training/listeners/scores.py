"""Listeners that add to an epoch's metrics before it is recorded: the stuck-run check, the
attention's health, evaluation, the objective's own validation, the ranks' agreement, the plateau schedule and the paper's stages."""

from __future__ import annotations

import math
import sys
from kdhar.engine import Plateau, evaluate_terms
from kdhar.objectives.gkd import DEGENERATE_ATTENTION_STD
from kdhar.objectives.stuck import is_stuck, stuck_reason, uniform_term
from kdhar.training.listeners.checkpoints import best_so_far
from kdhar.training.loop import Epoch, Listener, RunState
from kdhar.training.scoring import split_metrics

__all__ = ["STAGES", "AttentionHealth", "Evaluation", "ObjectiveValidation", "PlateauSchedule", "ShareMetrics",
           "StageAccuracy", "StuckWatch", "plateau_loss", "split_metrics", "stage_epochs"]

# The paper reports accuracy after 50, 150 and 200 of 200 epochs; we keep the same fractions of any run.
STAGES = {"early": 0.25, "mid": 0.75, "late": 1.0}


def stage_epochs(epochs: int) -> dict[str, int]:
    """1-based epoch at which each paper stage is read off (early/mid/late)."""
    return {name: max(1, math.ceil(frac * epochs)) for name, frac in STAGES.items()}


def plateau_loss(metrics: dict[str, float], first: str | None = None) -> float:
    """What the plateau schedule watches: the objective's own metric (`first`) when logged, else the
    validation split's loss, else the training loss; never the test split."""
    for key in (first, "val_loss", "train_loss"):
        if key in metrics:
            return metrics[key]
    raise KeyError("no loss to watch")


class StuckWatch(Listener):
    """Marks each epoch `collapsed` when the run is stuck (`kdhar.objectives.stuck.is_stuck`: past
    its first STUCK_MIN_STEPS steps, train accuracy at chance after half the epochs, or earlier for a
    distilled run whose soft loss is no lower than a uniform student's), tags the run with the last epoch's verdict and says why."""

    def __init__(self, epochs: int, soft_term: str | None) -> None:
        self.epochs, self.term = epochs, soft_term

    def _losses(self, metrics: dict[str, float]) -> tuple[float | None, float | None]:
        if self.term is None:
            return None, None
        return metrics.get(f"train_{self.term}"), metrics.get(f"train_{uniform_term(self.term)}")

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        m = epoch.metrics
        steps = epoch.done * len(run.prep.train_loader)  # the net pass's optimiser steps so far
        m["collapsed"] = float(is_stuck(m["train_acc"], run.prep.num_classes, epoch.done / self.epochs, steps,
                                        *self._losses(m)))

    def on_train_end(self, run: RunState) -> None:
        if not run.history:
            return
        last = run.history[-1]
        stuck = bool(last.get("collapsed", 0.0))
        run.tracker.set_tags({"collapsed": str(stuck).lower()})
        if stuck and run.prep.progress:
            why = stuck_reason(last["train_acc"], run.prep.num_classes, int(last["epoch"]), self.epochs,
                               *self._losses(last))
            print(f"[{run.prep.role} {run.prep.cfg.model.arch}] stuck (tagged collapsed=true): {why}",
                  file=sys.stderr, flush=True)


class AttentionHealth(Listener):
    """GKD's attention module: logs `attention_std` (the std of the attention over the epoch's
    training clips, mean over channels and time) and `attention_degenerate` when it is below
    DEGENERATE_ATTENTION_STD, i.e. the attention is the same for every clip; tags the run with the
    last epoch's verdict and says so."""

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        std = run.prep.step.attention_std()
        if std is not None:
            epoch.metrics["attention_std"] = std
            epoch.metrics["attention_degenerate"] = float(std < DEGENERATE_ATTENTION_STD)

    def on_train_end(self, run: RunState) -> None:
        last = next((h for h in reversed(run.history) if "attention_std" in h), None)
        if last is None:
            return
        degenerate = bool(last["attention_degenerate"])
        run.tracker.set_tags({"attention_degenerate": str(degenerate).lower()})
        if degenerate and run.prep.progress:
            print(f"[{run.prep.role} {run.prep.cfg.model.arch}] degenerate attention (tagged attention_degenerate=true): "
                  f"its std over the training clips is {last['attention_std']:.2e} < {DEGENERATE_ATTENTION_STD:g}, "
                  f"the same attention for every clip (gkd.norm {run.prep.cfg.gkd.norm})", file=sys.stderr, flush=True)


class Evaluation(Listener):
    """Scores the model on the evaluation splits each epoch (`test_*`, `val_*`, as the run's
    evaluation reads them: accuracies, or a detector's mAPs) and keeps the test scores for the final
    metrics; rank 0 only (the other ranks wait for its metrics)."""

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        prep = run.prep
        for name, loader in prep.eval_loaders.items():
            result = prep.evaluation.score(prep.model, name, loader, prep.device)
            epoch.metrics.update(prep.evaluation.metrics(name, result))
            if name == "test":
                run.last_test = result

    def on_train_end(self, run: RunState) -> None:
        prep = run.prep
        if run.last_test is None and "test" in prep.eval_loaders:  # a resumed run that had already trained every epoch
            run.last_test = prep.evaluation.score(prep.model, "test", prep.eval_loaders["test"], prep.device)


class ObjectiveValidation(Listener):
    """The objective's own validation each epoch (e.g. PCL's pretext loss on fixed test tuples),
    logged as `<validation_prefix>_*`; rank 0 only."""

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        prep = run.prep
        prefix = prep.objective.validation_prefix
        scores = evaluate_terms(prep.step, prep.val_loader, prep.device)
        epoch.metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})


class ShareMetrics(Listener):
    """Under torchrun: rank 0's metrics on every rank, so every rank steps the plateau schedule
    and stops at the same epoch."""

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        epoch.metrics = run.prep.ddp.broadcast_object(epoch.metrics)


class PlateauSchedule(Listener):
    """Steps the plateau schedule on the watched loss (`plateau_loss`) and logs its scale."""

    def __init__(self, plateau: Plateau, metric: str | None) -> None:
        self.plateau, self.metric = plateau, metric

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        self.plateau.step(plateau_loss(epoch.metrics, self.metric))
        epoch.metrics["plateau_scale"] = self.plateau.scale


class StageAccuracy(Listener):
    """The paper's stages: the test score at 25/75/100 % of the epochs (`acc_<stage>` of the video
    accuracy; a detector's `map_<stage>` of `map_avg`), the best one reached by then
    (`best_acc_<stage>`, as the KD paper reads its stages) and, with a selection metric (PCL's
    self-supervised validation loss, which upstream selects its checkpoint by), the test score of the
    epoch with its lowest value so far (`sel_acc_<stage>`, that epoch `sel_epoch_<stage>`): what a
    checkpoint chosen without looking at the test split scores."""

    def __init__(self, epochs: int, select: str | None = None, headline: str = "video_top1",
                 prefix: str = "acc") -> None:
        self.stages, self.select = stage_epochs(epochs), select
        self.metric, self.prefix = f"test_{headline}", prefix

    def on_run_start(self, run: RunState) -> None:
        """A run resumed with more epochs has new stages; those its history already passed are
        logged again from it, at their new epoch (MLflow shows a metric's value at its last step)."""
        if "optim.epochs" not in run.prep.changed:
            return
        before = stage_epochs(run.prep.changed["optim.epochs"][0])
        key, prefix = self.metric, self.prefix
        for stage, at in self.stages.items():
            reached = run.history[:at]
            if at != before[stage] and len(reached) == at and all(key in h for h in reached):
                run.tracker.log_metrics({f"{prefix}_{stage}": reached[-1][key],
                                         f"best_{prefix}_{stage}": max(h[key] for h in reached)}, step=at)

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        m, key = epoch.metrics, self.metric
        if key not in m:
            return
        history = [*run.history, {"epoch": epoch.done, **m}]
        best_test = max(h[key] for h in history)
        chosen = best_so_far(history, self.select, lowest=True) if self.select else None
        for stage, at in self.stages.items():
            if epoch.done == at:
                m[f"{self.prefix}_{stage}"] = m[key]
                m[f"best_{self.prefix}_{stage}"] = best_test
                if chosen is not None:
                    m[f"sel_{self.prefix}_{stage}"] = chosen[key]
                    m[f"sel_epoch_{stage}"] = float(chosen["epoch"])
