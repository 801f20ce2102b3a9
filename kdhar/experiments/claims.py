"""Who trains a cell, read from the tracking store: its FINISHED run (`finished_run`), the checkpoint
of its interrupted run (`interrupted_run`), and the claims of the grid runners (`Claims`), so that
two runners on one spec, here or on other machines, train each cell once.

A runner that died leaves runs and claims RUNNING; they count as dead once their process is gone
(its pid on this machine, or its heartbeat on another: `tracking.seems_dead`), and are ended or
deleted by whoever looks next. `reconcile_runs` ends them without running anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdhar.experiments.plan import Cell

CHECKPOINTS = Path("runs") / "checkpoints"  # where run_training writes them (its default workdir)
CLAIM_SETTLE_S = 1.0  # a second look at the claims, for a runner whose claim landed at the same moment
CLAIM_POLL_S = 5.0


def finished_run(experiment: str, role: str, key: str) -> str | None:
    """The newest FINISHED run of `role` whose `config_hash` is `key`, or None."""
    from kdhar import tracking

    runs = tracking.find_runs(
        experiment, f"tags.config_hash = '{key}' and tags.role = '{role}' and attributes.status = 'FINISHED'"
    )
    return runs[0]["run_id"] if runs else None


def interrupted_run(experiment: str, cell: Cell, key: str, log: Callable[[str], None],
                    gone: Callable[[dict[str, str]], bool] | None = None) -> str | None:
    """The checkpoint to resume this cell from: its newest run that ended KILLED, or is still RUNNING
    although its process is gone (a worker killed outright: its pid on this machine, or its heartbeat
    on another, `tracking.seems_dead`, or whatever else `gone` says of its tags: a Ray task's earlier
    attempt), and left a checkpoint (on a machine of its own, one under a shared working directory).
    Other such runs of the cell are ended KILLED, so none stays RUNNING."""
    from kdhar import tracking

    runs = tracking.find_runs(experiment, f"tags.config_hash = '{key}' and tags.role = '{cell.role}' and "
                                          "attributes.status != 'FINISHED'")
    chosen = None
    for run in runs:  # newest first
        status, tags = run["status"], run["tags"]
        if status == "RUNNING" and not tracking.seems_dead(tags) and not (gone and gone(tags)):
            continue  # still training, here or on a machine whose heartbeat is fresh
        checkpoint = CHECKPOINTS / run["run_id"] / "last.pt"
        if status == "RUNNING":
            tracking.end_run_as(run["run_id"], "KILLED")
        if chosen is None and status in ("RUNNING", "KILLED") and checkpoint.exists():
            chosen = str(checkpoint)
            log(f"{cell.label()}: resuming run {run['run_id']} from its checkpoint")
    return chosen


def end_orphaned_runs(experiment: str, role: str, key: str) -> list[str]:
    """Ends as KILLED the cell's runs left RUNNING by a process that is gone (a pool worker killed
    outright, which could not end its run itself); returns their ids, newest first. A later grid run
    resumes the newest from its checkpoint (`interrupted_run`)."""
    from kdhar import tracking

    ended = []
    for run in tracking.find_runs(experiment, f"tags.config_hash = '{key}' and tags.role = '{role}' and "
                                              "attributes.status = 'RUNNING'"):
        if tracking.seems_dead(run["tags"]):
            tracking.end_run_as(run["run_id"], "KILLED")
            ended.append(run["run_id"])
    return ended


def reconcile_runs(experiment: str) -> list[str]:
    """Ends as KILLED every run of `experiment` left RUNNING by a process that is gone: one of this
    machine whose `pid` is not alive, or one of another machine whose `heartbeat` is older than
    `tracking.stale_after()`; returns their ids. Runs from before those tags are left alone:
    nothing here can tell whether they still train."""
    from kdhar import tracking

    ended = []
    for run in tracking.find_runs(experiment, "attributes.status = 'RUNNING'"):
        if tracking.seems_dead(run["tags"]):
            tracking.end_run_as(run["run_id"], "KILLED")
            ended.append(run["run_id"])
    return ended


class Claims:
    """Cells this grid runner trains, claimed in the tracking store so that a second runner on the
    same spec (on this machine or another) waits for them instead of training them again.

    A claim is a marker run tagged with the cell's `config_hash`; of the live claims of a cell the
    oldest (start time, then run id) wins, read right away and again `CLAIM_SETTLE_S` later (for a
    runner whose claim landed at the same moment). A claim whose runner is gone (its process on this
    machine, or its heartbeat, which `start` keeps beating, on another) does not count (it is deleted),
    so a killed runner's cells are taken over.
    """

    def __init__(self, experiment: str) -> None:
        self.experiment, self.mine = experiment, {}
        self._heartbeat = None

    def start(self) -> None:
        """Beats the heartbeat of this runner's claims until `stop`."""
        from kdhar import tracking

        self._heartbeat = tracking.Heartbeat(lambda: list(self.mine.values()))
        self._heartbeat.start()

    def stop(self) -> None:
        """Stops the heartbeat; the claims themselves stay until released."""
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def _live(self, key: str) -> list[dict]:
        from kdhar import tracking

        runs = tracking.find_runs(self.experiment, f"tags.role = 'claim' and tags.claim = '{key}' and "
                                                   "attributes.status = 'RUNNING'")
        live = []
        for run in runs:
            if tracking.seems_dead(run["tags"]):
                tracking.delete_run(run["run_id"])  # its runner died (here, or its heartbeat stopped)
                continue
            live.append(run)
        return sorted(live, key=lambda r: (r["start_time"], r["run_id"]))

    def take(self, cells: dict[str, str]) -> set[str]:
        """Claims cells (config_hash -> label) at once; returns those won, not held by another live runner."""
        from kdhar import tracking

        tags = tracking.process_tags()
        mine = {key: tracking.create_claim(self.experiment, key, f"claim-{label}", tags) for key, label in cells.items()}
        won = set(mine)
        for delay in (0.0, CLAIM_SETTLE_S):
            time.sleep(delay)
            for key in sorted(won):
                live = self._live(key)
                if live and live[0]["run_id"] != mine[key]:
                    tracking.delete_run(mine[key])
                    won.discard(key)
        self.mine.update({key: mine[key] for key in won})
        return won

    def held_elsewhere(self, key: str) -> bool:
        """Whether another live runner holds the cell `key`."""
        return any(r["run_id"] != self.mine.get(key) for r in self._live(key))

    def wait(self, role: str, key: str) -> str | None:
        """Waits while another runner holds the cell `key`; returns the run it finished, or None if
        that runner stopped without finishing it (the cell is free to claim again)."""
        while (run_id := finished_run(self.experiment, role, key)) is None and self.held_elsewhere(key):
            time.sleep(CLAIM_POLL_S)
        return run_id

    def release(self, key: str) -> None:
        """Deletes this runner's claim of the cell `key`, if it holds one."""
        from kdhar import tracking

        run_id = self.mine.pop(key, None)
        if run_id:
            tracking.delete_run(run_id)

    def release_all(self) -> None:
        for key in list(self.mine):
            self.release(key)
