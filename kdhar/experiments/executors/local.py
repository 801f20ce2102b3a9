"""The grid's default executor: the cells of a wave in this process, or in a pool of spawned worker
processes on this machine (`kdhar experiment run SPEC --workers N`).

Workers ignore Ctrl-C (the parent SIGTERMs them, and each ends its run KILLED) and die with the
parent (Linux `PR_SET_PDEATHSIG`), so an interrupted or killed grid leaves no worker training.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from kdhar.experiments.executors.base import CellJob, WorkerDied, run_cell
from kdhar.experiments.grid import SpecError


class LocalExecutor:
    """The cells in this process (workers=1) or in a pool of `workers` processes on this machine,
    each with cores // workers torch threads."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise SpecError(f"workers {workers} must be >= 1")
        self.workers = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}"

    def train(self, jobs: list[CellJob], done: Callable[[CellJob, str, float], None]) -> None:
        """See `Executor.train`."""
        if self.workers == 1:
            for job in jobs:
                done(job, *run_cell(*job.args(progress=True)))
            return
        ctx = multiprocessing.get_context("spawn")  # forked workers would inherit torch/mlflow threads
        pool = ProcessPoolExecutor(min(self.workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                                   initargs=(self.threads, os.getpid()))
        try:
            pending = {pool.submit(_run_cell_in_worker, *job.args(progress=False)): job for job in jobs}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(pending.pop(fut), *fut.result())  # a failed cell stops the grid; rerunning resumes
        except BrokenProcessPool:
            # A worker died without a word; the pool SIGTERMs the others, which end their runs KILLED.
            pool.shutdown(wait=True, cancel_futures=True)
            raise worker_died(jobs) from None
        except Exception:
            # A failed cell: start nothing more, let the cells in flight finish, then stop.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        except BaseException:
            # Ctrl-C: stop the workers now; each ends its run as KILLED before it exits.
            _stop_workers()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


def worker_died(jobs: list[CellJob]) -> WorkerDied:
    """The one-line error for a pool worker killed outright (SIGKILL, the out-of-memory killer) during
    a wave of `jobs`: the run it left RUNNING is ended KILLED here, as it could not end it itself, and
    the message names its cell and how the next grid run resumes it."""
    from kdhar.experiments.claims import end_orphaned_runs

    killed = [f"{job.cell.label()} (run {run_id})" for job in jobs
              for run_id in end_orphaned_runs(job.experiment, job.cell.role, job.key)]
    if not killed:
        return WorkerDied("a grid worker process was killed (kill -9 or out of memory) before its cell's run started; "
                          "run the same `kdhar experiment run` again to train the cells left")
    return WorkerDied(f"a grid worker process was killed (kill -9 or out of memory) while training {'; '.join(killed)}: "
                      "its run was ended KILLED and the other cells in flight were stopped; run the same `kdhar "
                      "experiment run` again to resume them from their last checkpoints")


def _init_worker(threads: int, parent_pid: int) -> None:
    import threading

    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    # tqdm's default lock is a named semaphore that a worker killed outright never releases, and the
    # resource tracker then warns of a leak when the grid exits; workers show no bars, a thread lock will do.
    tqdm.set_lock(threading.RLock())
    # Ctrl-C reaches the whole process group; the parent alone handles it (see _stop_workers),
    # so a worker waiting for its next cell does not die with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A pool worker outlives a parent killed by SIGTERM or SIGKILL and would go on taking queued
    # cells. On Linux the kernel sends it SIGTERM when the parent dies, which ends its run KILLED.
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(128 + signal.SIGTERM)


def _stop_workers(timeout_s: float = 60.0) -> None:
    """SIGTERMs this process's pool workers and waits until each has closed its run."""
    children = multiprocessing.active_children()
    for proc in children:
        proc.terminate()
    for proc in children:
        proc.join(timeout_s)


def _run_cell_in_worker(*job: Any) -> tuple[str, float]:
    """`run_cell` in a pool worker, which exits once a signal has stopped its cell.

    The pool would otherwise report the interruption as the cell's result and hand the worker
    the next cell of an interrupted grid.
    """
    from kdhar.tracking import RunTerminated

    try:
        return run_cell(*job)
    except RunTerminated as exc:
        os._exit(128 + exc.signum)
