"""The experiment grid on Ray: `kdhar experiment run SPEC --executor ray [--address ADDR]`.

The grid runs in the driver exactly as with the local executor (`kdhar.experiments.run_grid`):
waves in order, claims, FINISHED cells skipped, interrupted runs resumed, checkpoints pruned. Only
the step "train these claimed cells" differs: each cell of a wave is one Ray task, which calls
`run_cell` with the cell's arguments on whichever node Ray picks, with the driver's tracking URI
and working directory (checkpoints live under runs/checkpoints there, so on a cluster it is a
shared directory, seen at the same path by every node; see docs/scaling.md, "The grid on Ray").

A task asks for one GPU where the cluster has GPUs (or --device cuda), else none, and as many CPUs
as the cell's torch threads (`threads`, which run_training sets). Ray retries a task whose worker
process or node died (`MAX_RETRIES`), never one whose cell raised (`retry_exceptions=False`): a
retry ends its earlier attempt's run KILLED (each attempt tags its run with the task's `grid_task`)
and resumes it from its checkpoint, so no attempt is left RUNNING.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable

import ray

from kdhar.experiments.claims import finished_run, interrupted_run
from kdhar.experiments.executors.base import CellJob, run_cell
from kdhar.tracking import RunTerminated

MAX_RETRIES = 3  # attempts after the first, for a worker process or node that died
ATTEMPT_TAG = "grid_task"  # one value per cell submitted, kept by Ray's retries of it
CANCEL_WAIT_S = 60.0  # after Ctrl-C or SIGTERM, how long the driver waits for Ray to stop the tasks


class RayClusterError(ValueError):
    """No Ray cluster at the address given; the message says how to start one."""


class RayExecutor:
    """Trains each claimed cell of a wave as a Ray task (see the module's docstring).

    Args:
        address: passed to `ray.init(address=...)`: "auto" (the cluster this node belongs to) or
            "host:6379" (a head node); None starts a Ray instance on this machine. A Ray already
            initialised in this process (a notebook's, a test's) is used as it is.
        log: receives a line when a cell fails.
    """

    def __init__(self, address: str | None = None, log: Callable[[str], None] = print) -> None:
        self.address, self.log = address, log
        self._owns = False
        self.cpus = self.gpus = 0.0

    def start(self) -> None:
        if not ray.is_initialized():
            try:
                _check_reachable(self.address)
                ray.init(address=self.address)
            except (ConnectionError, OSError) as exc:
                raise RayClusterError(
                    f"no Ray cluster at --address {self.address}: {_first_line(exc)}; start one with "
                    "`ray start --head` (docs/scaling.md) or leave out --address for a local one") from None
            self._owns = True
        resources = ray.cluster_resources()
        self.cpus, self.gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)

    def close(self) -> None:
        if self._owns:
            ray.shutdown()
            self._owns = False

    def describe(self) -> str:
        where = f"at {self.address}" if self.address else "on this machine"
        return f"Ray {where}: {self.cpus:g} CPUs, {self.gpus:g} GPUs"

    def task_device(self, device: str | None) -> tuple[str | None, int]:
        """The device a task trains on and the GPUs it asks for: "auto" is a GPU where the cluster
        has any, and "cuda:N" is the one GPU Ray gives the task (it sees that one only)."""
        if device is not None and device.startswith("cuda"):
            return "cuda", 1
        if device in (None, "auto"):
            return ("cuda", 1) if self.gpus >= 1 else ("cpu", 0)
        return device, 0

    def train(self, jobs: list[CellJob], done: Callable[[CellJob, str, float], None]) -> None:
        from kdhar import tracking

        uri, workdir = tracking.tracking_uri(), os.getcwd()
        pending: dict[ray.ObjectRef, tuple[CellJob, str]] = {}
        for job in jobs:
            device, gpus = self.task_device(job.device)
            attempt = uuid.uuid4().hex
            task = _train_cell.options(
                num_cpus=max(1, job.cell.cfg.optim.threads), num_gpus=gpus, max_retries=MAX_RETRIES,
                retry_exceptions=False, name=f"kdhar {job.cell.label()}"[:200])
            pending[task.remote(job, device, uri, workdir, attempt)] = (job, attempt)
        failure: BaseException | None = None
        sigterm, restore = _catch_sigterm()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                if sigterm:
                    raise RunTerminated(sigterm[0])
                for ref in ready:
                    job, attempt = pending.pop(ref)
                    try:
                        run_id, seconds = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        # The wave's other cells go on (each is a run of its own); the grid stops after them.
                        cause = _cause(job, exc)
                        failure = failure or cause
                        _end_attempts(job.experiment, [attempt])  # a worker that died MAX_RETRIES + 1 times
                        self.log(f"{job.cell.label()}: failed: {_first_line(cause)}; the grid stops once the "
                                 "cells in flight end (Ctrl-C stops them now)")
                        continue
                    done(job, run_id, seconds)
        except BaseException:
            # Ctrl-C, SIGTERM (e.g. a batch job's end) or the driver failing: stop every task of the wave;
            # force, because a task busy in torch would see a gentle cancel only at its next Python line.
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
            # A killed worker cannot end its run: end it here, so none is left RUNNING.
            for job, attempt in pending.values():
                _end_attempts(job.experiment, [attempt])
            raise
        finally:
            restore()
        if failure is not None:
            raise failure


@ray.remote
def _train_cell(job: CellJob, device: str | None, tracking_uri: str, workdir: str, attempt: str) -> tuple[str, float]:
    """One cell in a Ray worker: `run_cell` in the driver's working directory and tracking store.

    A retry (Ray's, after this task's worker or node died) finds the run of its earlier attempt by
    the `grid_task` tag, ends it KILLED and resumes it from its checkpoint; an attempt that had
    finished before its worker died is taken as it is.
    """
    from kdhar import tracking

    tracking.use_tracking_uri(tracking_uri)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(
            f"Ray node {socket.gethostname()} does not have the grid's working directory {workdir}: every node "
            "must see it at the same path (a shared filesystem; see docs/scaling.md)")
    os.chdir(workdir)  # checkpoints (runs/checkpoints) and relative dataset roots resolve there
    cell, key = job.cell, job.key
    finished = finished_run(job.experiment, cell.role, key)
    if finished is not None:
        return finished, 0.0
    lines: list[str] = []  # the driver said so already, unless this is a retry that found its earlier attempt
    resume = interrupted_run(job.experiment, cell, key, lines.append, gone=lambda tags: tags.get(ATTEMPT_TAG) == attempt)
    if resume != job.resume and lines:
        print(*lines, sep="\n", flush=True)
    job = dataclasses.replace(job, device=device, tags={**job.tags, ATTEMPT_TAG: attempt}, resume=resume)
    return run_cell(*job.args(progress=False))


# The HTTP/2 client preface and an empty SETTINGS frame: a Ray head's GCS is a gRPC server, which
# answers them with a SETTINGS frame of its own at once.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x4  # the frame type byte of a SETTINGS frame (the 4th of its 9-byte header)
GREETING_WAIT_S = 5.0  # a head answers in milliseconds; this is for a slow network


def _check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """Fails within seconds where a HOST:PORT address does not answer as a Ray head (a gRPC server):
    Ray itself keeps trying for many minutes, where nothing listens and where something else does
    (a database, a web server, a port forward to nowhere). "auto" and other forms are left to Ray,
    and so is a cluster with TLS (RAY_USE_TLS), which the plain-text greeting cannot reach."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return
        conn.settimeout(GREETING_WAIT_S)
        conn.sendall(_H2_PREFACE)
        head = b""
        try:
            while len(head) < 9 and (chunk := conn.recv(9 - len(head))):
                head += chunk
        except TimeoutError:
            pass
    if len(head) < 9 or head[3] != _H2_SETTINGS:
        raise ConnectionError(f"something listens at {host}:{port} but does not answer as a Ray head (a gRPC "
                              f"server) within {GREETING_WAIT_S:g} s")


def _catch_sigterm() -> tuple[list[int], Callable[[], None]]:
    """Notes a SIGTERM to the driver in the list returned, for the wait loop to stop the wave as
    Ctrl-C does (raising RunTerminated: exit code 143). Raising in the handler itself would not do:
    Ray turns an exception raised during its wait into SystemExit(1). Returns the list and what puts
    the previous handler back. Only the main thread can set handlers."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        return caught, lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    return caught, lambda: signal.signal(signal.SIGTERM, previous)


def _end_attempts(experiment: str, attempts: list[str]) -> None:
    """Ends as KILLED the runs these tasks left RUNNING (their workers are gone)."""
    from kdhar import tracking

    for attempt in attempts:
        for run in tracking.find_runs(experiment, f"tags.{ATTEMPT_TAG} = '{attempt}' and attributes.status = 'RUNNING'"):
            tracking.end_run_as(run["run_id"], "KILLED")


def _cause(job: CellJob, exc: ray.exceptions.RayError) -> BaseException:
    """The exception the cell raised (a RayTaskError wraps it), else one saying its task ended
    without a result (a worker that died on every attempt, a task cancelled from outside)."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, Exception) else exc
    return RuntimeError(f"{job.cell.label()}: its Ray task ended without a result ({type(exc).__name__}: "
                        f"{_first_line(exc)}); rerun the grid to resume it")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
