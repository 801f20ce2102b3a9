"""What a run keeps of the paper's stages beyond their accuracy (`StageAccuracy`): each stage's model,
and its clip retrieval, so the early or mid encoder can be scored or fine-tuned like the final one.

A stage at the run's last epoch is the run's final state: its model is the run's own logged model
and its retrieval the final one, neither made twice."""

from __future__ import annotations

from kdhar.training.listeners.scores import stage_epochs
from kdhar.training.loop import Epoch, Listener, RunState


def stage_model_name(stage: str) -> str:
    """The name of a stage's logged model: `runs:/<run id>/model-early` loads it."""
    return f"model-{stage}"


class StageModels(Listener):
    """Logs the model at each stage epoch before the last as a model of the run named
    `stage_model_name(stage)` (not the run's own model: `runs:/<run id>` stays the last epoch's),
    and tags the run `stage_model_<stage>` with every stage's models:/ URI, the last epoch's stages
    naming the run's own model; rank 0 only."""

    def __init__(self, epochs: int) -> None:
        self.epochs, self.stages = epochs, stage_epochs(epochs)

    def on_run_start(self, run: RunState) -> None:
        """A run resumed with more epochs has new stage epochs: a stage that moved to an epoch trained
        before the resume has no model (one logged under the old length is of another epoch)."""
        if "optim.epochs" not in run.prep.changed:
            return
        before = stage_epochs(run.prep.changed["optim.epochs"][0])
        run.tracker.set_tags({f"stage_model_{stage}": f"none: epoch {at} was trained before the run was resumed "
                              f"with {self.epochs} epochs" for stage, at in self.stages.items()
                              if at != before[stage] and at <= run.prep.start_epoch})

    def on_epoch_end(self, run: RunState, epoch: Epoch) -> None:
        prep = run.prep
        for stage, at in self.stages.items():
            if at == epoch.done < self.epochs:
                ref = run.tracker.log_model(prep.evaluation.loggable(prep.model), stage_model_name(stage),
                                            input_example=prep.evaluation.example(), run_model=False)
                run.tracker.set_tags({f"stage_model_{stage}": ref.model_uri})

    def on_train_end(self, run: RunState) -> None:
        if len(run.history) == self.epochs and run.model_uri:
            run.tracker.set_tags({f"stage_model_{stage}": run.model_uri
                                  for stage, at in self.stages.items() if at == self.epochs})


class StageRetrieval(Listener):
    """The objective's retrieval top-k at each stage epoch as `retrieval_top<k>_<stage>`; rank 0 only.
    Placed after `ObjectiveMetrics`, whose final retrieval the last epoch's stages take."""

    def __init__(self, epochs: int) -> None:
        self.epochs, self.stages = epochs, stage_epochs(epochs)

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None:
        stages = [stage for stage, at in self.stages.items() if at == epoch.done < self.epochs]
        if stages:
            prep = run.prep
            scores = prep.objective.final_metrics(prep.model, prep.cfg, prep.splits, prep.device)
            epoch.metrics.update(per_stage(scores, stages))

    def on_train_end(self, run: RunState) -> None:
        if len(run.history) == self.epochs:
            run.final.update(per_stage(run.final, [s for s, at in self.stages.items() if at == self.epochs]))


def per_stage(scores: dict[str, float], stages: list[str]) -> dict[str, float]:
    """The top-k scores of `scores` once per stage, e.g. retrieval_top1 -> retrieval_top1_early."""
    return {f"{k}_{stage}": v for k, v in scores.items() if k.startswith("retrieval_top") for stage in stages}
