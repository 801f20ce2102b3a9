"""The compose team stack's security, run natively with the real components: the MLflow server's
entrypoint (basic-auth, weak passwords refused, secrets off the command line) against a real
PostgreSQL, kdhar signing in to it, and the least-privilege role Optuna workers connect as."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import PG_HOST, PG_PORT, PG_USER, _free_port, fresh_database

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "docker" / "mlflow-entrypoint.sh"
WORKER_INIT = REPO / "docker" / "postgres-init" / "20-optuna-worker.sh"
ADMIN_PW, PG_PW, KEY = "admin-pw-3f9c1d2e", "pg-pw-8a7b6c5d4e", "csrf-key-0f1e2d3c4b5a"
BIN = str(Path(sys.executable).parent)  # mlflow and kdhar beside this Python

if sys.platform != "linux":  # /proc/<pid>/cmdline is what `ps` shows
    pytestmark = pytest.mark.skip(reason="reads the process command line from /proc")


def test_compose_runs_these_scripts_with_secrets_from_the_environment():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mlflow = compose["services"]["mlflow"]
    assert mlflow["entrypoint"][-1].endswith("mlflow-entrypoint.sh") and "command" not in mlflow
    assert "${MLFLOW_ADMIN_PASSWORD" in mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert "mlflow-entrypoint.sh" in (REPO / "docker" / "mlflow.Dockerfile").read_text()
    for service in compose["services"].values():
        assert ":" in service.get("image", "x:pinned") and not service.get("image", "").endswith(":latest")


RULE = ("12 or more characters, 8 or more of them different, of at least two kinds (lowercase, uppercase, digits, "
        "others)")


# Empty, the example's, short, then 12 characters of too few different ones or of one kind only.
@pytest.mark.parametrize("weak", ["", "change-me", "short-pw", "aaaaaaaaaaaa", "abcabcabcabc", "abcdefghijkl",
                                  "123456789012"])
def test_the_compose_scripts_refuse_the_example_or_a_weak_password(weak, tmp_path):
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "POSTGRES_PASSWORD": PG_PW,
           "MLFLOW_AUTH_ADMIN_PASSWORD": weak, "MLFLOW_FLASK_SERVER_SECRET_KEY": KEY, "MLFLOW_AUTH_DIR": str(tmp_path)}
    done = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 64
    assert done.stderr.strip() == ("mlflow: MLFLOW_AUTH_ADMIN_PASSWORD is empty, the example's 'change-me' or weak: "
                                   f"set one in .env with {RULE}")
    # The PostgreSQL init script holds the Optuna workers' role to the same rule, before any psql.
    done = subprocess.run(["sh", str(WORKER_INIT)], env={**os.environ, "OPTUNA_WORKER_PASSWORD": weak},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 64
    assert done.stderr.strip() == ("postgres init: OPTUNA_WORKER_PASSWORD is empty, the example's 'change-me' or "
                                   f"weak: set one in .env with {RULE}")


def test_the_files_the_stack_and_its_docs_cite_as_its_tests_exist():
    import re

    citing = [REPO / "docker-compose.yml", REPO / "README.md", *(REPO / "docker").rglob("*"), *(REPO / "docs").glob("*.md")]
    cited = {(path.relative_to(REPO), name) for path in citing if path.is_file()
             for name in re.findall(r"tests/test_\w+\.py", path.read_text())}
    assert cited and [c for c in cited if not (REPO / c[1]).is_file()] == []


@pytest.fixture(scope="module")
def signed_in_server(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    """The compose `mlflow` entrypoint run natively on a fresh PostgreSQL database (basic-auth, admin
    ADMIN_PW); yields its URI and process. One per module: it takes 7-25 s to start."""
    tmp_path = tmp_path_factory.mktemp("team-server")
    port = _free_port()
    with fresh_database() as backend:
        store = backend.replace(f"{PG_USER}@", f"{PG_USER}:{PG_PW}@")  # trust auth: accepted and ignored
        env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "MLFLOW_BACKEND_STORE_URI": store,
               "POSTGRES_PASSWORD": PG_PW, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PW, "MLFLOW_FLASK_SERVER_SECRET_KEY": KEY,
               "MLFLOW_AUTH_DIR": str(tmp_path / "auth"), "MLFLOW_ARTIFACTS": str(tmp_path / "artifacts"),
               "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT_IN": str(port), "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{port}",
               "MLFLOW_WORKERS": "1"}
        server = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 180
            while time.time() < deadline and server.poll() is None:
                try:
                    if requests.get(f"{uri}/health", timeout=2).ok:
                        break
                except (requests.ConnectionError, requests.Timeout):  # not listening, or still starting
                    time.sleep(0.5)
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            yield uri, server
        finally:
            if server.poll() is None:
                os.killpg(server.pid, 15)
                server.wait(timeout=60)


@pytest.mark.slow
def test_the_server_requires_sign_in_and_kdhar_works_with_credentials(signed_in_server, tmp_path):
    from mlflow import MlflowClient

    from kdhar.data.synthetic import SynthSpec, generate

    uri, server = signed_in_server
    root = generate(tmp_path / "ucf101", "ucf101", SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=12,
                                                            size=(48, 64), seed=9)).root
    # Nothing without signing in, and no password on any command line of the server's processes.
    search = f"{uri}/api/2.0/mlflow/experiments/search"
    assert requests.get(search, params={"max_results": 1}, timeout=10).status_code == 401
    assert requests.get(search, params={"max_results": 1}, auth=("admin", ADMIN_PW), timeout=10).status_code == 200
    pids = [server.pid, *map(int, subprocess.run(["pgrep", "-s", str(server.pid)], capture_output=True,
                                                 text=True).stdout.split())]
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert ADMIN_PW not in cmdline and PG_PW not in cmdline and KEY not in cmdline

    kdhar_env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    train = ["kdhar", "train-teacher", "--arch", "tiny3d", "--root", str(root), "--epochs", "1", "--width", "4",
             "--clip-len", "4", "--crop", "32", "--num-workers", "0", "--experiment", "team"]
    train[0] = str(Path(BIN) / "kdhar")
    refused = subprocess.run(train, env=kdhar_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "needs credentials: set MLFLOW_TRACKING_USERNAME" in refused.stderr
    signed_in = {**kdhar_env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PW}
    done = subprocess.run(train, env=signed_in, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PW)
    try:
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("team").experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["role"] == "teacher"
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key, None)


@pytest.mark.slow  # the server's start; the checks themselves take milliseconds
def test_wrong_credentials_are_told_apart_from_missing_ones(signed_in_server, monkeypatch):
    from kdhar.tracking import TrackingError, check_server

    uri, _ = signed_in_server
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(TrackingError, match="needs credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        check_server(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    with pytest.raises(TrackingError, match="needs MLFLOW_TRACKING_PASSWORD too: only MLFLOW_TRACKING_USERNAME is set"):
        check_server(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PW + "-typo")
    with pytest.raises(TrackingError) as wrong:
        check_server(uri)
    assert str(wrong.value) == (f"MLflow tracking server at {uri} rejected the credentials of user 'admin': check "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    assert ADMIN_PW not in str(wrong.value)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PW)
    check_server(uri)  # signed in


def test_optuna_workers_connect_as_a_role_that_reaches_the_optuna_database_only(tmp_path):
    import optuna
    import psycopg2

    worker = f"kdhar_worker_{uuid.uuid4().hex[:8]}"
    with fresh_database() as optuna_url, fresh_database() as mlflow_url:
        optuna_db, mlflow_db = optuna_url.rsplit("/", 1)[1], mlflow_url.rsplit("/", 1)[1]
        env = {**os.environ, "PGHOST": PG_HOST, "PGPORT": str(PG_PORT), "POSTGRES_USER": PG_USER,
               "OPTUNA_WORKER_USER": worker, "OPTUNA_WORKER_PASSWORD": "worker-pw-1234", "OPTUNA_DB": optuna_db,
               "MLFLOW_DB": mlflow_db}
        try:
            weak = subprocess.run(["sh", str(WORKER_INIT)], env={**env, "OPTUNA_WORKER_PASSWORD": "change-me"},
                                  capture_output=True, text=True, timeout=60)
            assert weak.returncode == 64 and "OPTUNA_WORKER_PASSWORD is empty, the example's" in weak.stderr
            done = subprocess.run(["sh", str(WORKER_INIT)], env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            as_worker = optuna_url.replace(f"{PG_USER}@", f"{worker}@")
            study = optuna.create_study(study_name="w", storage=as_worker)  # creates Optuna's tables as the worker
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
            with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
                psycopg2.connect(host=PG_HOST, port=PG_PORT, user=worker, dbname=mlflow_db)
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
            with conn.cursor() as cur:
                cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = %s", (worker,))
                assert cur.fetchone() == (False, False, False)
            conn.close()
        finally:
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
            conn.autocommit = True
            with conn.cursor() as cur:
                for db in (optuna_db, mlflow_db):
                    cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
                cur.execute(f'DROP ROLE IF EXISTS "{worker}"')
            conn.close()
