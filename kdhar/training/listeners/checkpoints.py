"""The checkpoint listener: `last.pt` every epoch, `best.pt` on a new validation best."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from kdhar import distributed
from kdhar.checkpoint import save_checkpoint
from kdhar.engine import rng_state
from kdhar.training.loop import Epoch, Listener, RunState
from kdhar.training.resume import stored_config

BEST_METRIC = "val_video_top1"  # what best.pt keeps the best of; never the test split


def heads_state(step: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A step's own saved weights beyond the model's (a method's heads), for a resume."""
    model = getattr(step, "model", None)
    prefix = next((f"{name}." for name, child in step.named_children() if child is model), None)
    return {k: v for k, v in step.state_dict().items() if prefix is None or not k.startswith(prefix)}


class Checkpointer(Listener):
    """Saves what a resume needs after every epoch under <workdir>/checkpoints/<run id>/; rank 0 only."""

    def __init__(self, workdir: str | Path, best_metric: str = BEST_METRIC) -> None:
        self.workdir, self.best_metric = workdir, best_metric
        self.path: Path | None = None

    def on_run_start(self, run: RunState) -> None:
        self.path = Path(self.workdir) / "checkpoints" / run.run_id / "last.pt"

    def on_epoch_end(self, run: RunState, epoch: Epoch) -> None:
        prep = run.prep
        state = {
            "model": prep.model.state_dict(),
            "heads": heads_state(prep.step),
            **prep.optimisers.state_dict(),
            "epoch": epoch.done,
            "history": run.history,
            "rng": rng_state(),
            "run_id": run.run_id,
            "classes": prep.splits.classes,
            "arch": prep.cfg.model.arch,
            "config": stored_config(prep.cfg, prep.objective.teacher is not None),
        }
        save_epoch(self.path, state, run.history, self.workdir if prep.ddp is not None else None, self.best_metric)


def save_epoch(path: Path, state: dict[str, Any], history: list[dict[str, float]], elastic_dir: Path | str | None,
               metric: str = BEST_METRIC) -> None:
    """The epoch's checkpoint (`last.pt`), `best.pt` when the validation score (`metric`: the video
    accuracy, or a detector's mAP) reached a new best (weights only, loadable as a --teacher or
    --init checkpoint; the logged model is the last epoch's), and for a torchrun job the record its
    restart resumes from."""
    save_checkpoint(path, state)
    if _new_best(history, metric):
        best = {k: state[k] for k in ("model", "epoch", "run_id", "classes", "arch", "config")}
        save_checkpoint(path.with_name("best.pt"), {**best, metric: history[-1][metric]})
    if elastic_dir is not None:
        distributed.record_checkpoint(elastic_dir, path)


def _new_best(history: list[dict[str, float]], metric: str) -> bool:
    """Whether the last epoch set a new maximum of `metric` (validation runs only)."""
    if not history or metric not in history[-1]:
        return False
    return history[-1][metric] > max((h.get(metric, -math.inf) for h in history[:-1]), default=-math.inf)
