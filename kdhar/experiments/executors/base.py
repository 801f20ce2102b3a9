"""What every executor shares: `CellJob`, one claimed cell to train; `Executor`, the protocol an
executor keeps; and `run_cell`, which trains one cell wherever the executor runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kdhar.experiments.plan import Cell


class WorkerDied(RuntimeError):
    """A process training cells died without a word (SIGKILL, the out-of-memory killer): the message
    names its cells, says how their runs were ended and how to resume them."""


@dataclass(frozen=True)
class CellJob:
    """A claimed cell to train: `run_cell`'s arguments, less whether it shows progress bars (the
    executor's choice), and the cell's place in the plan."""

    position: int
    cell: Cell
    experiment: str
    device: str | None
    tags: dict[str, str]  # config_hash and the cell's own tags
    cache_teacher: bool
    teacher_uri: str | None
    resume: str | None  # a checkpoint of the cell's interrupted run

    @property
    def key(self) -> str:
        """The cell's `config_hash`."""
        return self.tags["config_hash"]

    def args(self, progress: bool) -> tuple:
        """`run_cell`'s positional arguments."""
        return (self.cell, self.experiment, self.device, self.tags, self.cache_teacher, progress, self.teacher_uri,
                self.resume)


class Executor(Protocol):
    """Trains the cells of one wave that the grid claimed. The grid decides what to train and in
    which order (waves, claims, skipping FINISHED cells, resuming from checkpoints, pruning); an
    executor only decides where each `run_cell` call runs."""

    def start(self) -> None: ...

    def describe(self) -> str:
        """A few words for the grid's first line, e.g. "2 workers"."""
        ...

    def train(self, jobs: list[CellJob], done: Callable[[CellJob, str, float], None]) -> None:
        """Trains every job, calling `done(job, run_id, seconds)` in this thread as each finishes.
        A failed cell's exception is raised (after the cells in flight finish); Ctrl-C stops them all."""
        ...

    def close(self) -> None: ...


def run_cell(
    cell: Cell, experiment: str, device: str | None, tags: dict[str, str], cache_teacher: bool, progress: bool,
    teacher_uri: str | None = None, resume: str | None = None,
) -> tuple[str, float]:
    """Trains one cell (from `resume`, a checkpoint of its interrupted run, if given); returns its run
    id and wall-clock seconds. Runs in a worker process too."""
    start = time.perf_counter()
    if cell.role == "teacher":
        from kdhar.train import run_training

        res = run_training(cell.cfg, role="teacher", experiment=experiment, tags=tags, device=device,
                           progress=progress, resume=resume)
    elif cell.role == "pretrain":
        from kdhar.objectives import build_objective
        from kdhar.train import run_training

        res = run_training(cell.cfg, role="pretrain", experiment=experiment, objective=build_objective(cell.cfg, labels=False),
                           tags=tags, device=device, progress=progress, resume=resume)
    elif cell.role == "student":
        from kdhar.distill import distill

        after_ssl = cell.source is not None  # starts from its PCL pretraining; its stages are this run's
        res = distill(cell.cfg, teacher=teacher_uri or "none", experiment=experiment, device=device, extra_tags=tags,
                      # the logit cache holds logits, which only logit KD reads
                      cache_teacher=cache_teacher and cell.teacher != "none" and cell.cfg.gkd.method == "logit"
                      and not cell.cfg.gkd.attention,
                      progress=progress, resume=resume, init=f"runs:/{tags['source_run']}" if after_ssl else None,
                      init_key=tags.get("init_key"), stage_models=True if after_ssl else None)
    else:
        from kdhar.finetune import finetune

        res = finetune(f"runs:/{tags['source_run']}", cell.cfg, experiment=experiment, tags=tags,
                       device=device, progress=progress, resume=resume)
    return res.run_id, time.perf_counter() - start
