"""The checkpoint listener: `last.pt` every epoch, `best.pt` on a new validation best (the objective's
own selection metric where it has one: PCL's self-supervised validation loss)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from kdhar import distributed
from kdhar.checkpoint import remove_partial_writes, save_checkpoint
from kdhar.engine import rng_state
from kdhar.training.loop import Epoch, Listener, RunState
from kdhar.training.resume import run_identity, stored_config

BEST_METRIC = "val_video_top1"  # what best.pt keeps the best of; never the test split
BEST_KEYS = ("model", "epoch", "run_id", "classes", "arch", "config", "identity")  # what best.pt holds


def best_so_far(history: list[dict[str, float]], metric: str, lowest: bool = False) -> dict[str, float] | None:
    """The epoch of `history` with the best `metric` (the highest, or with `lowest` the lowest; the
    first of equals), or None when no epoch logged it."""
    logged = [h for h in history if metric in h and not math.isnan(h[metric])]
    if not logged:
        return None
    sign = -1.0 if lowest else 1.0
    return max(logged, key=lambda h: sign * h[metric])


def heads_state(step: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A step's own saved weights beyond the model's (a method's heads), for a resume."""
    model = getattr(step, "model", None)
    prefix = next((f"{name}." for name, child in step.named_children() if child is model), None)
    return {k: v for k, v in step.state_dict().items() if prefix is None or not k.startswith(prefix)}


class Checkpointer(Listener):
    """Saves what a resume needs after every epoch under <workdir>/checkpoints/<run id>/; rank 0 only."""

    def __init__(self, workdir: str | Path, select: str | None = None, best_metric: str = BEST_METRIC) -> None:
        """`select`: the objective's selection metric (lowest best) for `best.pt`; None: the highest
        `best_metric` of the validation split (the video accuracy, or a detector's mAP)."""
        self.workdir, self.select, self.best_metric = workdir, select, best_metric
        self.path: Path | None = None

    def on_run_start(self, run: RunState) -> None:
        self.path = checkpoint_dir(self.workdir, run.run_id) / "last.pt"
        # A resumed run's earlier process may have been killed in the middle of a write.
        for name in ("last.pt", "best.pt"):
            remove_partial_writes(self.path.with_name(name))

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
            "identity": run_identity(prep.role, prep.objective),
        }
        save_epoch(self.path, state, run.history, self.workdir if prep.ddp is not None else None, self.select,
                   self.best_metric)


def checkpoint_dir(workdir: str | Path, run_id: str) -> Path:
    """The folder of a run's `last.pt` and `best.pt`."""
    return Path(workdir) / "checkpoints" / run_id


def save_epoch(path: Path, state: dict[str, Any], history: list[dict[str, float]], elastic_dir: Path | str | None,
               select: str | None = None, best_metric: str = BEST_METRIC) -> None:
    """`best.pt` when the validation score (`best_metric`: the video accuracy, or a detector's mAP)
    or the lowest `select` reached a new best (weights only, loadable as a --teacher or --init
    checkpoint; the logged model is the last epoch's), then the epoch's checkpoint (`last.pt`), and
    for a torchrun job the record its restart resumes from.

    best.pt goes first so that a process killed at any point leaves a pair a resume completes: killed
    before last.pt is replaced, the resume trains the epoch again and finds the same new best; in the
    other order, a kill between the two left last.pt past a best that best.pt never got (or no
    best.pt at all), and the resumed run's history no longer saw that epoch as new."""
    metric = select or best_metric
    if history and metric in history[-1] and best_so_far(history, metric, lowest=select is not None) is history[-1]:
        best = {k: state[k] for k in BEST_KEYS}
        save_checkpoint(path.with_name("best.pt"), {**best, metric: history[-1][metric]})
    save_checkpoint(path, state)
    if elastic_dir is not None:
        distributed.record_checkpoint(elastic_dir, path)
