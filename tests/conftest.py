"""Shared pytest fixtures.

The tracking fixtures run the same topology as `docker compose up`, natively: a real PostgreSQL
database and a real `mlflow server` process serving artifacts from a temporary folder.

`make test` runs the suite on parallel workers (pytest-xdist, `--dist loadgroup`). Tests that share
something a worker cannot copy carry an `xdist_group` mark and run on one worker, in file order: the
tests on the session's `mlflow server` (one registry, whose champion aliases later tests read), and
`SEVERAL_PROCESSES`: the tests that start several training processes sized for the whole machine and
wait on them with deadlines (torchrun, Ray, two tuning or grid workers), so that no two of them
compete for the cores at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
# Measured on 2 shared cores: a fresh server (schema migrations included) answers /health after
# 7 s when idle and 25 s when the cores are busy; the margin covers a loaded CI machine.
SERVER_START_TIMEOUT_S = 120.0


SERVER_GROUP = "mlflow-server"
SEVERAL_PROCESSES = pytest.mark.xdist_group("several-processes")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Puts every test that uses the session's mlflow server into one xdist group.

    A worker has its own session, so spreading these tests would start one server (and database) per
    worker, and tests reading the registry's champion would no longer see the runs registered before them.
    """
    for item in items:
        if "mlflow_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(SERVER_GROUP))


@pytest.fixture(autouse=True)
def _own_environment() -> Iterator[None]:
    """Gives each test the environment it started with back afterwards: a kdhar command run in the
    test's process quietens MLflow and Optuna through environment variables (MLFLOW_LOGGING_LEVEL,
    KDHAR_QUIET_OPTUNA), which would otherwise reach the subprocesses of later tests on the same
    worker and hide the log lines they read."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test (as the grid's cells run), then as it was: tests that compare
    two computations bit for bit, or time a step, need the same thread count on every machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kdhar_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Runs the `kdhar` console entry point in this process, as `kdhar_cli(*args, cwd=..., env=...)`,
    and returns what a subprocess would: a CompletedProcess with the exit status, stdout and stderr.

    For tests about what a command does and says, not about processes (signals, kills, what `ps`
    shows): a new interpreter costs 5-8 s of imports a command. An exception the entry point does
    not turn into a one-line error propagates into the test and fails it. The environment, working
    folder and torch's thread count are the test's own again afterwards."""
    import torch

    from kdhar.cli import main

    def run(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        threads = torch.get_num_threads()
        with monkeypatch.context() as patch:
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            if cwd is not None:
                patch.chdir(cwd)
            patch.setattr(sys, "argv", ["kdhar", *argv])
            capsys.readouterr()
            code = 0
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            finally:
                torch.set_num_threads(threads)
            out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """Creates a uniquely named database on the local PostgreSQL, drops it on exit, and yields its
    SQLAlchemy URL.

    The driver is named explicitly because SQLAlchemy 2.1 maps a bare `postgresql://` to
    psycopg 3, while the project ships psycopg2.
    """
    import psycopg2

    name = f"kdhar_test_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with conn.cursor() as cur:
            # FORCE: a server or pool still connected must not keep the database alive.
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (see `fresh_database`)."""
    with fresh_database() as url:
        yield url


def mlflow_server_command(backend_uri: str, artifacts: Path, port: int) -> list[str]:
    """The `mlflow server` command line the tests run; docker-compose.yml runs the same flags."""
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri", backend_uri,
        "--serve-artifacts",
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
        "--workers", "1",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on its own PostgreSQL database, serving artifacts from a temporary
    folder; one per test session. Yields its http URI."""
    with fresh_database() as backend_uri:
        yield from _run_mlflow_server(backend_uri, tmp_path_factory.mktemp("mlflow_server"))


def _run_mlflow_server(backend_uri: str, workdir: Path) -> Iterator[str]:
    port = _free_port()
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            mlflow_server_command(backend_uri, workdir / "artifacts", port),
            cwd=workdir,
            # As the team stack's entrypoint runs it: without MLflow's job runner, whose worker
            # processes kdhar never uses.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own process group: the server forks uvicorn, and a hung
            # shutdown must take all of them down.
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {proc.returncode}:\n{log_path.read_text()}"
                )
            try:
                if requests.get(f"{uri}/health", timeout=1).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or still starting up
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server not healthy after {SERVER_START_TIMEOUT_S:.0f} s:\n"
                    f"{log_path.read_text()}"
                )
            time.sleep(0.25)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # pytest shows captured teardown output only when something failed.
        print(f"--- mlflow server log ({log_path}) ---\n{log_path.read_text()}")


@pytest.fixture
def server_tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points MLflow at the shared test server for one test; returns its URI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture
def local_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points MLflow at a SQLite store in tmp_path (artifacts beside it); returns the URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Local stores put artifacts under ./mlruns of the working directory.
    monkeypatch.chdir(tmp_path)
    return uri

