"""Listeners for the run's outcome, once the last epoch is done: the objective's own final metrics
(e.g. retrieval), the final report, the logged model and, once the run has ended, the registry."""

from __future__ import annotations

import math

from kdhar import tracking
from kdhar.plots import curves_figure
from kdhar.training.identity import registered_name
from kdhar.training.loop import Listener, RunState

CHAMPION_METRIC = "val_video_top1"


class ObjectiveMetrics(Listener):
    """The objective's final metrics of the trained model (PCL: nearest-neighbour retrieval)."""

    def on_train_end(self, run: RunState) -> None:
        prep = run.prep
        run.final.update(prep.objective.final_metrics(prep.model, prep.cfg, prep.splits, prep.device))


class FinalReport(Listener):
    """Logs the final metrics (`final_test_*` from the last test scores, the objective's own,
    `best_val_<headline>`), the evaluation's own report (recognition: the confusion matrix and the
    per-class report; detection: per-class APs, timelines and the AP table) and the learning curves."""

    def on_train_end(self, run: RunState) -> None:
        result, history, tracker, evaluation = run.last_test, run.history, run.tracker, run.prep.evaluation
        final, figures, data = evaluation.report(result) if result is not None else ({}, {}, {})
        final.update(run.final)
        best_key = f"val_{evaluation.headline}"
        best_val = max((h.get(best_key, float("nan")) for h in history), default=float("nan"))
        if not math.isnan(best_val):
            final[f"best_{best_key}"] = best_val
        run.final = final
        tracker.log_metrics(final, step=len(history))
        for name, figure in figures.items():
            tracker.log_figure(figure, name)
        for name, value in data.items():
            tracker.log_dict(value, name)
        tracker.log_figure(curves_figure(history), "learning_curves.png")


class LoggedModel(Listener):
    """Logs the last epoch's model (on the CPU, with an input example, in the form its evaluation
    gives it: a detector as one tensor out) and the objective's own state beside it (GKD, detectors:
    their teacher-side parts)."""

    def on_train_end(self, run: RunState) -> None:
        prep, tracker = run.prep, run.tracker
        prep.model.eval().cpu()
        model, example = prep.evaluation.loggable(prep.model), prep.evaluation.example()
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
            tracking.promote_champion(name, version, f"val_{prep.evaluation.headline}", prep.splits.fingerprint)
