"""What per-step metric logging costs the training thread, against a real local `mlflow server`.

Compares, for the same N calls of two metrics each:
  sync     `mlflow.log_metrics(...)`: one HTTP request per call, the caller waits for it;
  mlflow   `mlflow.log_metrics(..., synchronous=False)`: MLflow's own queue, one request per call
           sent from a thread pool;
  tracker  `RunTracker.log_metrics(...)`: kdhar's queue, drained into batched requests.
It prints milliseconds per call on the calling thread and the total time until every metric is
stored (the run ended), plus the ratios against `sync`.

    python benchmarks/bench_tracking.py --calls 2000

The server runs on a temporary SQLite store unless --backend-store-uri names another
(e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/<db>).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient

from kdhar.tracking import RunTracker


def start_server(backend_uri: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    """Starts `mlflow server` as the tests and docker-compose.yml do; returns it and its URI."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", backend_uri,
        "--serve-artifacts", "--artifacts-destination", str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port),
        "--allowed-hosts", f"127.0.0.1:{port}", "--workers", "1",
    ]  # fmt: skip
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mlflow server exited:\n{(workdir / 'server.log').read_text()}")
        try:
            if requests.get(f"{uri}/health", timeout=1).ok:
                return proc, uri
        except (requests.ConnectionError, requests.Timeout):
            pass  # still starting
        time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit("mlflow server did not become healthy within 180 s")


def timed(calls: int, log: Callable[[int], None], finish: Callable[[], None]) -> tuple[float, float]:
    """Returns (ms per call on this thread, total seconds including the final flush)."""
    start = time.perf_counter()
    for step in range(calls):
        log(step)
    logged = time.perf_counter()
    finish()
    done = time.perf_counter()
    return (logged - start) * 1000 / calls, done - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--backend-store-uri", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        backend = args.backend_store_uri or f"sqlite:///{workdir / 'bench.db'}"
        proc, uri = start_server(backend, workdir)
        try:
            os.environ["MLFLOW_TRACKING_URI"] = uri
            client = MlflowClient(uri)
            experiment_id = client.create_experiment("bench-tracking")
            results = {}

            def metrics(step: int) -> dict[str, float]:
                return {"train.loss": 1.0 / (step + 1), "train.lr": 0.01}

            for mode, synchronous in (("sync", True), ("mlflow", False)):
                with mlflow.start_run(experiment_id=experiment_id, run_name=mode) as run:
                    results[mode] = timed(
                        args.calls,
                        lambda s, sync=synchronous: mlflow.log_metrics(metrics(s), step=s, synchronous=sync),
                        mlflow.flush_async_logging,
                    )
                assert len(client.get_metric_history(run.info.run_id, "train.loss")) == args.calls

            tracker = RunTracker("bench-tracking", run_name="tracker")
            tracker.__enter__()
            results["tracker"] = timed(
                args.calls, lambda s: tracker.log_metrics(metrics(s), step=s), tracker.flush
            )
            tracker.__exit__(None, None, None)
            assert len(client.get_metric_history(tracker.run_id, "train.loss")) == args.calls
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    sync_ms, sync_total = results["sync"]
    print(f"{args.calls} calls x 2 metrics to {backend.split(':')[0]} via mlflow server")
    print(f"{'mode':<8} {'ms/call (caller)':>17} {'total s':>8} {'caller speed-up':>16} {'total speed-up':>15}")
    for mode, (ms, total) in results.items():
        print(f"{mode:<8} {ms:17.3f} {total:8.2f} {sync_ms / ms:15.1f}x {sync_total / total:14.1f}x")


if __name__ == "__main__":
    main()
