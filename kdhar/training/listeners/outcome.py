"""Listeners for the run's outcome, once the last epoch is done: the objective's own final metrics
(e.g. retrieval), the final report, the logged model and, once the run has ended, the registry."""

from __future__ import annotations

import math

import numpy as np

from kdhar import tracking
from kdhar.plots import confusion_figure, curves_figure
from kdhar.training.identity import registered_name
from kdhar.training.listeners.scores import split_metrics
from kdhar.training.loop import Listener, RunState

CHAMPION_METRIC = "val_video_top1"


class ObjectiveMetrics(Listener):
    """The objective's final metrics of the trained model (PCL: nearest-neighbour retrieval)."""

    def on_train_end(self, run: RunState) -> None:
        prep = run.prep
        run.final.update(prep.objective.final_metrics(prep.model, prep.cfg, prep.splits, prep.device))


class FinalReport(Listener):
    """Logs the final metrics (`final_test_*` from the last test scores, the objective's own,
    `best_val_video_top1`), the confusion matrix, the per-class report and the learning curves."""

    def on_train_end(self, run: RunState) -> None:
        result, history, tracker, classes = run.last_test, run.history, run.tracker, run.prep.splits.classes
        final = split_metrics("final_test", result) if result is not None else {}
        final.update(run.final)
        best_val = max((h.get("val_video_top1", float("nan")) for h in history), default=float("nan"))
        if not math.isnan(best_val):
            final["best_val_video_top1"] = best_val
        run.final = final
        tracker.log_metrics(final, step=len(history))
        if result is not None:
            tracker.log_figure(confusion_figure(result["confusion"], classes), "confusion_matrix.png")
            tracker.log_dict({"per_class": result["per_class"], "classes": classes}, "per_class_report.json")
        tracker.log_figure(curves_figure(history), "learning_curves.png")


class LoggedModel(Listener):
    """Logs the last epoch's model (on the CPU, with an input example) and the objective's own
    state beside it (GKD: its teacher-side parts)."""

    def on_train_end(self, run: RunState) -> None:
        prep, tracker = run.prep, run.tracker
        model, clip = prep.model, prep.cfg.clip
        model.eval().cpu()
        example = np.zeros((2, 3, clip.clip_len, clip.crop, clip.crop), dtype=np.float32)
        run.model_uri = tracker.log_model(model, tracking.model_name(tracker.run_name or "model"),
                                          input_example=example).model_uri
        logged_state = prep.objective.logged_state
        for name, value in (logged_state(prep.step) if logged_state else {}).items():
            tracker.log_torch(value, name)


class Registry(Listener):
    """Registers the logged model as a new version once the run has ended FINISHED, so a run killed
    or failed before then leaves no version behind (and cannot become champion). It competes for
    `@champion` on the validation split only (the last epoch's, as the logged weights are the last
    epoch's); a run without one, or without a classifier to score, never becomes champion."""

    def on_run_end(self, run: RunState) -> None:
        prep = run.prep
        name = registered_name(prep.role, prep.objective.registry_label, prep.cfg.model.arch)
        version = tracking.register_model(run.model_uri, name, run.run_id)
        if prep.objective.labels and prep.splits.val is not None:
            tracking.promote_champion(name, version, CHAMPION_METRIC, prep.splits.fingerprint)
