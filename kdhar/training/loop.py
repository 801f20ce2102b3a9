"""The epoch loop: each epoch trains the step's passes and hands the epoch to listeners.

The loop knows passes, optimisers and the schedule; what happens around an epoch (scores,
checkpoints, logging, stopping) lives in listeners (`kdhar.training.listeners`), which it calls in
their order at each event:

    on_run_start(run)           the run is open in the tracker
    on_epoch_metrics(run, ep)   add to ep.metrics (scores, plateau, stages); then the loop appends
                                the epoch to run.history
    on_epoch_end(run, ep)       record the finished epoch; a listener ends the run by setting run.stopped
    on_train_end(run)           the last epoch is done and the run still open: the outcome
    on_run_end(run)             the run has ended FINISHED in the tracker

An exception from the loop or a listener ends the run FAILED (the tracker's exit does it) and
reaches the caller; no event is fired for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from kdhar.engine import WINDOW, train_one_epoch
from kdhar.training.prepare import Prepared


class StopTraining(Exception):
    """Raised by an epoch callback to end a run early (e.g. a pruned tuning trial)."""


@dataclass
class RunState:
    """One run as the loop and its listeners see it while it is open."""

    prep: Prepared
    tracker: Any  # kdhar.tracking.RunTracker, or a NullTracker off rank 0
    run_id: str
    history: list[dict[str, float]]  # one entry per finished epoch, resumed ones included
    stopped: str | None = None  # why the run ended early, set by a listener
    last_test: dict[str, Any] | None = None  # the test scores of the weights as they are now
    final: dict[str, float] = field(default_factory=dict)  # the run's final metrics
    model_uri: str | None = None  # the logged model


@dataclass
class Epoch:
    index: int  # 0-based, as the passes number it
    stats: dict[str, Any]  # the "net" pass's statistics, first-batch losses included
    metrics: dict[str, float]  # what is logged for the epoch

    @property
    def done(self) -> int:
        """Epochs finished, this one included: the epoch's step in the tracker."""
        return self.index + 1


class Listener:
    """Subscribes to the loop's events; every event does nothing unless a listener overrides it."""

    def on_run_start(self, run: RunState) -> None: ...

    def on_epoch_metrics(self, run: RunState, epoch: Epoch) -> None: ...

    def on_epoch_end(self, run: RunState, epoch: Epoch) -> None: ...

    def on_train_end(self, run: RunState) -> None: ...

    def on_run_end(self, run: RunState) -> None: ...


class EpochLoop:
    """Trains the prepared run from its first unfinished epoch to the configured last one."""

    def __init__(self, prep: Prepared, listeners: Iterable[Listener]) -> None:
        self.prep, self.listeners = prep, list(listeners)

    def run(self, tracker: Any) -> RunState:
        """Opens `tracker`, trains, and closes it; returns the run as the listeners left it."""
        prep, ddp = self.prep, self.prep.ddp
        with tracker:
            run_id = tracker.run_id if ddp is None else ddp.broadcast_object(tracker.run_id)
            run = RunState(prep, tracker, run_id, prep.history)
            self._fire("on_run_start", run)
            for index in range(prep.start_epoch, prep.cfg.optim.epochs):
                epoch = train_epoch(run, index)
                self._fire("on_epoch_metrics", run, epoch)
                run.history.append({"epoch": epoch.done, **epoch.metrics})
                self._fire("on_epoch_end", run, epoch)
                if run.stopped:
                    break
            self._fire("on_train_end", run)
        if ddp is not None:  # rank 0's outcome on every rank
            run.final, run.model_uri = ddp.broadcast_object((run.final, run.model_uri))
        self._fire("on_run_end", run)
        return run

    def _fire(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            getattr(listener, event)(*args)


def train_epoch(run: RunState, index: int) -> Epoch:
    """One epoch: the step's side passes, each with its own optimiser, then the "net" pass."""
    prep, ddp = run.prep, run.prep.ddp
    prep.view.train.set_epoch(index)
    if hasattr(prep.step, "set_epoch"):
        prep.step.set_epoch(index)
    extras = prep.objective.batch_extras
    batches = prep.train_loader if extras is None else _WithExtras(prep.train_loader, extras)
    side_metrics = {}
    for name, side in prep.optimisers.side.items():
        prep.step.set_pass(name)
        stats = _pass(run, batches, side, index, name)
        side_metrics.update({f"train_{name}_{k}": float(v) for k, v in stats.items()
                             if k.endswith("loss") and not k.startswith("first_")})
        side_metrics[f"train_{name}_seconds"] = stats["seconds"]
    if prep.optimisers.side:
        prep.step.set_pass("net")
    stats = _pass(run, batches, prep.optimisers.net, index)
    if ddp is not None:
        ddp.broadcast_module(prep.step, buffers_only=True)  # rank 0's BatchNorm statistics on every rank
    metrics = {f"train_{k}": float(v) for k, v in stats.items()
               if isinstance(v, (int, float)) and not k.startswith("first_")}
    metrics.update(side_metrics)
    metrics["epoch_lr"] = prep.optimisers.net.param_groups[0]["lr"]
    return Epoch(index, stats, metrics)


def _pass(run: RunState, batches: Any, optimizer: torch.optim.Optimizer, index: int,
          name: str | None = None) -> dict[str, Any]:
    """One pass over the training set, its statistics reduced over the ranks; `name` None is the
    "net" pass, which the schedule drives and whose window metrics are logged unnamed (a side pass's
    read "window_cvae_loss", "cvae_lr")."""
    prep, ddp = run.prep, run.prep.ddp

    def log(metrics: dict[str, float], global_step: int) -> None:
        named = metrics if name is None else {_pass_key(name, k): v for k, v in metrics.items()}
        run.tracker.log_metrics(named, step=global_step)

    stats = train_one_epoch(
        prep.step, batches, optimizer, prep.device, scheduler=prep.optimisers.scheduler if name is None else None,
        amp_dtype=torch.bfloat16 if prep.device.type == "cuda" else None, progress=prep.progress, epoch=index,
        log=log, max_grad_norm=prep.cfg.optim.grad_clip, grad_sync=ddp.sync_grads if ddp else None,
    )
    return ddp.reduce_stats(stats) if ddp else stats


def _pass_key(name: str, key: str) -> str:
    """A side pass's metric key: its name after the window prefix, so its curves sort with the
    net pass's, or before any other key."""
    return f"{WINDOW}{name}_{key.removeprefix(WINDOW)}" if key.startswith(WINDOW) else f"{name}_{key}"


class _WithExtras:
    """Wraps a loader, adding what the objective needs per batch (e.g. cached teacher logits)."""

    def __init__(self, loader: Any, extras: Callable[[dict[str, Any]], dict[str, torch.Tensor]]) -> None:
        self.loader, self.extras = loader, extras

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            batch.update(self.extras(batch))
            yield batch
