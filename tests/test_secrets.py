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
    assert shown.stdout.strip() == "optuna-dashboard postgresql://kdhar:***@db.example:5432/optuna"
    assert SECRET not in shown.stdout + shown.stderr

    # Given on the command line it is refused in one line that says where it belongs.
    given = subprocess.run([*KDHAR, "tune", "--dashboard", "--storage", url], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "KDHAR_OPTUNA_STORAGE"})
    assert given.returncode == 2 and SECRET not in given.stdout + given.stderr
    [line] = given.stderr.strip().splitlines()
    assert line.startswith("Error: --storage postgresql://kdhar:***@db.example") and "KDHAR_OPTUNA_STORAGE" in line

    # In a file it works, and is masked.
    secret_file = tmp_path / "storage.txt"
    secret_file.write_text(url + "\n")
    filed = subprocess.run([*KDHAR, "tune", "--dashboard", "--storage-file", str(secret_file)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert filed.returncode == 0 and filed.stdout.strip() == shown.stdout.strip()


def _cmdlines_with(text: str) -> set[str]:
    """Command lines of this machine's processes that contain `text` (what `ps` would show)."""
    found = set()
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if text in cmdline:
            found.add(cmdline)
    return found


@pytest.mark.slow
def test_the_tune_entry_point_keeps_the_storage_password_out_of_processes_params_and_logs(postgres_db, tmp_path):
    from mlflow import MlflowClient

    from kdhar.data.synthetic import SynthSpec, generate

    root = generate(tmp_path / "ucf101", "ucf101", SynthSpec(num_classes=3, groups=4, clips_per_group=2, frames=8,
                                                             size=(48, 64), seed=1)).root
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bin_dir = str(Path(sys.executable).parent)  # where `kdhar` and `mlflow` are installed
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env.pop("KDHAR_OPTUNA_STORAGE", None)
    tiny = {"root": str(root), "clip_len": "4", "crop": "32", "frame_interval": "1", "test_clips": "1",
            "batch_size": "8", "width": "4", "num_workers": "0", "threads": "1", "epochs": "1"}
    teacher = subprocess.run([*KDHAR, "train-teacher", "--arch", "tiny3d", "--experiment", "teacher",
                              *[a for k, v in tiny.items() for a in (f"--{k.replace('_', '-')}", v)]],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    [checkpoint] = (tmp_path / "runs" / "checkpoints").glob("*/last.pt")

    storage = postgres_db.replace("postgres@", f"postgres:{SECRET}@")  # trust auth: accepted, not checked
    secret_file = tmp_path / "storage.txt"
    secret_file.write_text(storage + "\n")
    params = {**tiny, "teacher": str(checkpoint), "student": "tiny3d", "n_trials": "1", "experiment": "tune-secret",
              "study_name": "secret-study"}
    base = [str(Path(bin_dir) / "mlflow"), "run", str(REPO), "-e", "tune", "--env-manager", "local",
            "--experiment-name", "tune-secret", *[a for k, v in params.items() for a in ("-P", f"{k}={v}")]]
    proc = subprocess.Popen([*base, "-P", f"storage_file={secret_file}"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    leaks = set()
    while proc.poll() is None:  # watch the process list while the workers run
        leaks |= _cmdlines_with(SECRET)
        time.sleep(0.2)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert leaks == set()
    assert "Running command" in err and SECRET not in out + err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tune-secret").experiment_id])
    assert len(runs) >= 2  # the study's parent run and its trial
    for run in runs:
        assert SECRET not in repr(run.data.params) + repr(run.data.tags), run.info.run_id
    # The study went to the file's database. The parent is the project run, whose `storage` param MLflow
    # already set from -P (empty): kdhar's own value sits beside it as `storage.used`.
    used = [run.data.params.get("storage.used") or run.data.params.get("storage", "") for run in runs]
    assert any(u.endswith(postgres_db.rsplit("/", 1)[1]) and ":***@" in u for u in used), used

    refused = subprocess.run([*base, "-P", f"storage={storage}"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0
    assert "Error: --storage postgresql+psycopg2://postgres:***@" in refused.stderr
    assert "KDHAR_OPTUNA_STORAGE" in refused.stderr


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
