"""Storage passwords stay out of command lines and output: the tune CLI and the compose dashboard."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import _free_port

REPO = Path(__file__).resolve().parents[1]
KDHAR = [sys.executable, "-m", "kdhar.cli"]
SECRET = "s3cret-pw"


def test_tune_masks_the_storage_password_and_reads_it_from_the_environment(tmp_path):
    url = f"postgresql://kdhar:{SECRET}@db.example:5432/optuna"
    env = {**os.environ, "KDHAR_OPTUNA_STORAGE": url}
    shown = subprocess.run([*KDHAR, "tune", "--dashboard"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "optuna-dashboard postgresql+psycopg2://kdhar:***@db.example:5432/optuna"
    assert SECRET not in shown.stdout + shown.stderr

    # Given on the command line it still works, is masked, and the user is told where it belongs.
    given = subprocess.run([*KDHAR, "tune", "--dashboard", "--storage", url], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "KDHAR_OPTUNA_STORAGE"})
    assert given.returncode == 0 and SECRET not in given.stdout
    assert "KDHAR_OPTUNA_STORAGE" in given.stderr


def test_compose_dashboard_reads_its_storage_from_the_environment(postgres_db):
    # docker-compose.yml's optuna-dashboard entrypoint, run natively against a real PostgreSQL
    # (trust auth here, so the password in the URL is accepted and ignored).
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    service = compose["services"]["optuna-dashboard"]
    assert "command" not in service and not any("${POSTGRES_PASSWORD}" in part for part in service["entrypoint"])
    assert "${OPTUNA_WORKER_PASSWORD}" in service["environment"]["OPTUNA_STORAGE"]

    import optuna

    storage = postgres_db.replace("postgres@", f"postgres:{SECRET}@")
    optuna.create_study(study_name="compose", storage=storage)
    port = _free_port()
    env = {**os.environ, "OPTUNA_STORAGE": storage, "DASHBOARD_HOST": "127.0.0.1", "DASHBOARD_PORT": str(port)}
    entrypoint = [sys.executable if service["entrypoint"][0] == "python" else service["entrypoint"][0], *service["entrypoint"][1:]]
    proc = subprocess.Popen(entrypoint, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, answer = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.3)
        assert answer is not None and answer.status_code == 200, proc.stderr.read().decode() if proc.poll() is not None else ""
        assert "compose" in answer.text
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert SECRET not in cmdline
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if sys.platform != "linux":  # /proc/<pid>/cmdline is what `ps` shows
    pytestmark = pytest.mark.skip(reason="reads the process command line from /proc")
