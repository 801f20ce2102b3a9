"""Listeners that add to an epoch's metrics before it is recorded: collapse, evaluation, the
objective's own validation, the ranks' agreement, the plateau schedule and the paper's stages."""

from __future__ import annotations

import math
import sys
from typing import Any

from kdhar.engine import Plateau, evaluate, evaluate_terms
from kdhar.training.loop import Epoch, Listener, RunState

# The paper reports accuracy after 50, 150 and 200 of 200 epochs; we keep the same fractions of any run.
STAGES = {"early": 0.25, "mid": 0.75, "late": 1.0}


def stage_epochs(epochs: int) -> dict[str, int]:
    """1-based epoch at which each paper stage is read off (early/mid/late)."""
    return {name: max(1, math.ceil(frac * epochs)) for name, frac in STAGES.items()}


def split_metrics(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    """The logged scores of one evaluation (`kdhar.engine.evaluate`), as <prefix>_<score>."""
    keys = ("clip_top1", "clip_top5", "video_top1", "mean_class_acc", "loss")
    return {f"{prefix}_{k}": float(result[k]) for k in keys if k in result}


def plateau_loss(metrics: dict[str, float], first: str | None = None) -> float:
    """What the plateau schedule watches: the objective's own metric (`first`) when logged, else the
    validation split's loss, else the training loss; never the test split."""
    for key in (first, "val_loss", "train_loss"):
        if key in metrics:
            return metrics[key]
    raise KeyError("no loss to watch")


class CollapseWatch(Listener):
    """Marks each epoch `collapsed` when train accuracy sits at chance while the objective's
    collapse term did not come down from its first batch, and tags the run with the last verdict."""

    def __init__(self, term: str) -> None:
        self.term, self.start = term, None

    def on_run_start(self, run: RunState) -> None:
        # The watched loss where training starts (the first batch, before any step); kept in the
        # history so that a resumed run still has it.
        self.start = run.history[0].get(f"start_{self.term}") if run.history else None

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        m = epoch.metrics
        if self.start is None:
            self.start = epoch.stats[f"first_{self.term}"]
            m[f"start_{self.term}"] = self.start
        m["collapsed"] = float(run.prep.objective.collapsed(m["train_acc"], run.prep.num_classes, self.start,
                                                            m[f"train_{self.term}"]))

    def on_train_end(self, run: RunState) -> None:
        if not run.history:
            return
        collapsed = bool(run.history[-1].get("collapsed", 0.0))
        run.tracker.set_tags({"collapsed": str(collapsed).lower()})
        if collapsed and run.prep.progress:
            print(f"[{run.prep.role} {run.prep.cfg.model.arch}] collapsed: train accuracy at chance while {self.term} "
                  f"did not come down ({self.start:.3f} -> {run.history[-1][f'train_{self.term}']:.3f})",
                  file=sys.stderr, flush=True)


class Evaluation(Listener):
    """Scores the model on the evaluation splits each epoch (`test_*`, `val_*`) and keeps the test
    scores for the final metrics; rank 0 only (the other ranks wait for its metrics)."""

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        prep = run.prep
        for name, loader in prep.eval_loaders.items():
            result = evaluate(prep.model, loader, prep.device, prep.num_classes)
            epoch.metrics.update(split_metrics(name, result))
            if name == "test":
                run.last_test = result

    def on_train_end(self, run: RunState) -> None:
        prep = run.prep
        if run.last_test is None and "test" in prep.eval_loaders:  # a resumed run that had already trained every epoch
            run.last_test = evaluate(prep.model, prep.eval_loaders["test"], prep.device, prep.num_classes)


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
    """The paper's stages: test accuracy at 25/75/100 % of the epochs (`acc_<stage>`) and the best
    test accuracy reached by then (`best_acc_<stage>`, as the KD paper reads its stages)."""

    def __init__(self, epochs: int) -> None:
        self.stages = stage_epochs(epochs)

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        m = epoch.metrics
        if "test_video_top1" not in m:
            return
        best_test = max([h["test_video_top1"] for h in run.history] + [m["test_video_top1"]])
        for stage, at in self.stages.items():
            if epoch.done == at:
                m[f"acc_{stage}"] = m["test_video_top1"]
                m[f"best_acc_{stage}"] = best_test
