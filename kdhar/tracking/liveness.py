"""Whether the process behind a RUNNING run or a grid's claim is still there: the `host`, `pid` and
`pid_started` tags a process leaves, the heartbeat it sends, and the claims grid runners make."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from kdhar.tracking.project import get_or_create_experiment
from kdhar.tracking.store import _client

logger = logging.getLogger(__name__)


# A run in progress sets its `heartbeat` tag (unix seconds) every HEARTBEAT_S; a RUNNING run of another
# machine whose heartbeat is older than STALE_S (KDHAR_STALE_AFTER overrides it) is taken for dead:
# its process cannot be asked, as one on this machine can (`host`, `pid`). Ten missed beats leave
# room for a slow tracking server and for clocks a few minutes apart.
HEARTBEAT_TAG = "heartbeat"
HEARTBEAT_S = 60.0
STALE_S = 600.0


def stale_after() -> float:
    """Seconds without a heartbeat after which another machine's RUNNING run counts as dead."""
    value = os.environ.get("KDHAR_STALE_AFTER", "")
    try:
        return float(value) if value.strip() else STALE_S
    except ValueError:
        raise ValueError(f"KDHAR_STALE_AFTER={value!r}: give seconds, e.g. 600") from None


class Heartbeat(threading.Thread):
    """Sets the `heartbeat` tag of the runs `run_ids()` names, now and every `interval` seconds,
    until `stop()`. A process killed outright stops beating, which is how other machines see it."""

    def __init__(self, run_ids: Any, interval: float | None = None) -> None:
        super().__init__(name="kdhar-heartbeat", daemon=True)
        self.run_ids, self.interval = run_ids, HEARTBEAT_S if interval is None else interval
        self._stopped = threading.Event()

    def beat(self) -> None:
        client, now = _client(), str(int(time.time()))
        for run_id in list(self.run_ids()):
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, now)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the run's own calls report errors
                logger.debug("heartbeat of run %s not sent", run_id, exc_info=True)

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stopped.set()


# Beside `host` and `pid`: when that process started (boot id and start time in clock ticks from
# /proc), since a pid is reused: after a container restart pid 1 is alive again, but another process.
PID_STARTED_TAG = "pid_started"


def process_start(pid: int) -> str | None:
    """`<boot id>:<start time in clock ticks>` of process `pid`, which no later process with the same
    pid shares; None where /proc cannot tell (another OS, or no such process)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 is the start time; the command name (field 2) may hold spaces and ')', so count
    # from the last ')', after which field 3 comes.
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{boot}:{fields[22 - 3]}"


def process_tags() -> dict[str, str]:
    """`host`, `pid` and `pid_started` of this process: what `seems_dead` judges a run or claim by."""
    return stamp_process_start({"host": socket.gethostname(), "pid": str(os.getpid())})


def stamp_process_start(tags: dict[str, str]) -> dict[str, str]:
    """`tags` with `pid_started` added when their `pid` is this process's own."""
    started = process_start(os.getpid()) if tags.get("pid") == str(os.getpid()) else None
    return {**tags, PID_STARTED_TAG: started} if started else tags


def seems_dead(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the process behind a RUNNING run (or grid claim) is gone: on this machine its `pid`
    is not alive, or is alive but started at another time than `pid_started` says (a reused pid);
    on another its `heartbeat` is older than `stale_after()`. A run with neither (from before these
    tags) is never taken for dead."""
    if tags.get("host") == socket.gethostname():
        if not tags.get("pid"):
            return False
        pid = int(tags["pid"])
        if not process_alive(pid):
            return True
        recorded = tags.get(PID_STARTED_TAG)
        return bool(recorded) and process_start(pid) not in (None, recorded)
    beat = tags.get(HEARTBEAT_TAG)
    if not beat:
        return False
    return (time.time() if now is None else now) - float(beat) > stale_after()


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def create_claim(experiment: str, key: str, name: str, tags: dict[str, str]) -> str:
    """A marker run (tag role=claim, claim=key) saying that a grid runner is training the cell `key`;
    `delete_run` removes it (deleted runs are hidden from the UI and from `find_runs`)."""
    client = _client()
    exp_id = get_or_create_experiment(client, experiment)
    run = client.create_run(exp_id, run_name=name[:250], tags={"role": "claim", "claim": key, **tags})
    return run.info.run_id
