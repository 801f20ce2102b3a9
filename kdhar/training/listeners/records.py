"""Listeners that record the run: its parameters and data lineage, each epoch's line on stderr and
metrics in the tracker, and the caller's epoch callback (which may stop the run)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from kdhar.data.splits import part_fingerprint
from kdhar.training.loop import Epoch, Listener, RunState, StopTraining


class RunRecord(Listener):
    """Logs a new run's parameters, classes, data lineage and configuration. A resumed run has them;
    one that changed knobs on resume (`--allow-config-change`) gets its config.json again, with the
    values it now trains with (its params keep the first ones: MLflow never changes a logged param,
    and the tags `epochs`, `threads` and `resumed_with_changes` say what changed)."""

    def on_run_start(self, run: RunState) -> None:
        prep = run.prep
        if not prep.resume:
            self._record_new(run)
        if not prep.resume or prep.changed:
            config = prep.cfg.params(kd=prep.objective.teacher is not None) | {"determinism": prep.det_note}
            run.tracker.log_dict(config, "config.json")

    def _record_new(self, run: RunState) -> None:
        prep, tracker = run.prep, run.tracker
        cfg, splits, teacher = prep.cfg, prep.splits, prep.objective.teacher
        params = {**cfg.params(kd=False), **prep.objective.params, "role": prep.role, "device": str(prep.device),
                  "num_classes": prep.num_classes}
        params.update({"train_videos": len(splits.train.samples), "test_videos": len(splits.test.samples)})
        params["val_videos"] = len(splits.val.samples) if splits.val else 0
        if prep.init:
            params["init"] = prep.init
        if teacher is not None:
            params.update({"teacher.uri": teacher.uri, "teacher.run_id": teacher.run_id or "", "teacher.arch": teacher.arch or ""})
        tracker.log_params(params)
        tracker.log_dict({"classes": splits.classes}, "classes.json")
        # Lineage: which data (content digest of the full training list) and how each part was used.
        subset = f"-f{cfg.data.fraction:g}" if cfg.data.fraction < 1 else ""  # only training is subsampled
        parts = {f"train{subset}": splits.train, "validation": splits.val, "test": splits.test}
        for label, part in parts.items():
            if part is not None:
                tracker.log_dataset(f"{cfg.data.dataset}-split{cfg.data.split}-{label}", part_fingerprint(part),
                                    cfg.data.root, label.split("-")[0])
        if splits.missing:
            tracker.log_metrics({"missing_videos": splits.missing}, step=0)
        if prep.view.too_short:
            tracker.log_metrics({"too_short_videos": prep.view.too_short}, step=0)


class EpochClock:
    """The time since training began in this process and, at the mean pace of its epochs so far, the
    time the remaining epochs will take (a resumed run counts only the epochs it trains itself)."""

    def __init__(self, first_epoch: int, epochs: int):
        self.first_epoch, self.epochs, self.start = first_epoch, epochs, time.perf_counter()

    def eta(self, done: int) -> str:
        """E.g. "elapsed 0:36, remaining ~2:00" after `done` of the run's epochs."""
        elapsed = time.perf_counter() - self.start
        remaining = elapsed / max(done - self.first_epoch, 1) * max(self.epochs - done, 0)
        return f"elapsed {clock_text(elapsed)}, remaining ~{clock_text(remaining)}"


def clock_text(seconds: float) -> str:
    """M:SS, or H:MM:SS from an hour on."""
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressPrinter(Listener):
    """One line per epoch on stderr, piped or not: losses, accuracies, speed, elapsed and remaining
    time, so a log file or a scheduler's output shows how far a run is and when it should end (the
    in-epoch bar appears on a terminal only)."""

    def on_run_start(self, run: RunState) -> None:
        self.clock = EpochClock(run.prep.start_epoch, run.prep.cfg.optim.epochs)

    def on_epoch_end(self, run: RunState, epoch: Epoch) -> None:
        m = epoch.metrics
        shown = [f"loss {m['train_loss']:.3f}", f"train acc {m.get('train_acc', float('nan')):.3f}"]
        for key in sorted(k for k in m if k.startswith("train_") and k.endswith("_acc") and k != "train_acc"):
            name = key.removeprefix("train_").removesuffix("_acc")  # a method's own accuracy, e.g. pretext
            val = next((v for k, v in m.items() if k.endswith(f"val_{name}_acc")), float("nan"))
            shown.append(f"{name} acc {m[key]:.3f} (val {val:.3f})")
        shown += [f"{k.split('_')[0]} {m[k]:.3f}" for k in ("val_video_top1", "test_video_top1") if k in m]
        shown += [f"{m['train_clips_per_s']:.0f} clips/s, {m['train_seconds']:.0f}s", self.clock.eta(epoch.done)]
        prep = run.prep
        print(f"[{prep.role} {prep.cfg.model.arch}] epoch {epoch.done}/{prep.cfg.optim.epochs}: " + ", ".join(shown),
              file=sys.stderr, flush=True)


class MetricLogger(Listener):
    """Logs each epoch's metrics at the epoch's step."""

    def on_epoch_end(self, run: RunState, epoch: Epoch) -> None:
        run.tracker.log_metrics(epoch.metrics, step=epoch.done)


class EpochCallback(Listener):
    """Calls the caller's `callback(epoch, metrics)`; a StopTraining from it ends the run after this
    epoch, tagged `stopped_early` with its message."""

    def __init__(self, callback: Callable[[int, dict[str, float]], None]) -> None:
        self.callback = callback

    def on_epoch_end(self, run: RunState, epoch: Epoch) -> None:
        try:
            self.callback(epoch.done, epoch.metrics)
        except StopTraining as exc:
            run.stopped = str(exc) or "stopped"
            run.tracker.set_tags({"stopped_early": run.stopped})
