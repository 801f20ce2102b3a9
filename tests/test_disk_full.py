"""A full disk under a training run, for real: a small tmpfs holds the run's files, and the disk is
filled while the run trains, or is too small for the logged model. Each case must end in one line
naming where and what to do, with no traceback and no run left RUNNING that the line does not name.

Mounting a tmpfs needs root (or CAP_SYS_ADMIN); where it is not allowed the tests are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kdhar.checkpoint import load_checkpoint
from kdhar.data.synthetic import SynthSpec, generate

KDHAR = [sys.executable, "-m", "kdhar.cli"]
TINY_OPTS = ["--width", "4", "--clip-len", "4", "--crop", "32", "--num-workers", "0", "--batch-size", "8"]


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "8m") mounted at `path`, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Fills `disk` to its last byte with one file, which is returned (delete it to free the space)."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return ballast


@pytest.fixture(scope="module")
def tiny_ucf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "ucf101"
    generate(root, "ucf101", SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=12, size=(48, 64), seed=1))
    return root


def error_lines(stderr: str) -> list[str]:
    """stderr without the run's per-epoch progress lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[teacher")]


@pytest.mark.slow
def test_disk_filling_up_under_the_default_store_is_one_line_and_no_run_stays_running_unnamed(tiny_ucf, tmp_path,
                                                                                             monkeypatch):
    # The default ./mlflow.db, the checkpoints and the artifacts on one disk that fills up after the
    # first epoch: 15 chained tracebacks (SQLite's "database or disk is full" through SQLAlchemy and
    # MLflow), and the run left RUNNING.
    with small_disk(tmp_path / "disk", "32m") as disk:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow's default store
        args = [*KDHAR, "train-teacher", "--arch", "tiny3d", "--root", str(tiny_ucf), "--epochs", "8", *TINY_OPTS,
                "--experiment", "full"]
        proc = subprocess.Popen(args, cwd=disk, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                found = list((disk / "runs" / "checkpoints").glob("*/last.pt"))
                if found and load_checkpoint(found[0])["epoch"] >= 1:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, "the run ended before the disk could be filled"
            proc.send_signal(signal.SIGSTOP)  # the disk fills while the run waits, wherever it is
            ballast = fill(disk)
            proc.send_signal(signal.SIGCONT)
            out, err = proc.communicate(timeout=240)
        finally:
            proc.kill()
        lines = error_lines(err)
        assert proc.returncode == 1 and "Traceback" not in err, err
        assert len(lines) == 1 and lines[0].startswith("Error: disk full at "), err
        (run_id,) = [p.name for p in (disk / "runs" / "checkpoints").iterdir()]
        assert f"run {run_id}" in lines[0] and f"--resume runs/checkpoints/{run_id}/last.pt" in lines[0]

        ballast.unlink()
        client = MlflowClient(f"sqlite:///{disk / 'mlflow.db'}")
        if client.get_run(run_id).info.status == "RUNNING":
            # The store could not record the end: the line says so and names the command that ends it.
            assert "stays RUNNING" in lines[0] and "`kdhar runs reconcile --experiment full`" in lines[0]
            from kdhar.experiments import reconcile_runs  # what that command runs

            monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{disk / 'mlflow.db'}")
            assert reconcile_runs("full") == [run_id] and client.get_run(run_id).info.status == "KILLED"
        else:
            assert client.get_run(run_id).info.status == "FAILED" and f"run {run_id} ended FAILED" in lines[0]


def test_a_checkpoint_the_full_disk_refused_ends_the_run_failed_and_the_line_names_it(tmp_path, local_tracking):
    # Which write meets the full disk first is a race in the test above: when it is the checkpoint,
    # the line said what was lost and how to resume, but not which run ended, nor how.
    import torch

    from kdhar.checkpoint import save_checkpoint
    from kdhar.disk import DiskFullError
    from kdhar.tracking import RunTracker

    with small_disk(tmp_path / "disk", "1m") as disk:
        path = disk / "run" / "last.pt"
        save_checkpoint(path, {"epoch": 1})
        fill(disk)
        with pytest.raises(DiskFullError) as caught, RunTracker("full", run_name="r") as run:
            save_checkpoint(path, {"epoch": 2, "w": torch.ones(1 << 16)})
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"disk full at {path.parent}: checkpoint not written")
    assert f"--resume {path}" in line and line.endswith(f"; run {run.run_id} ended FAILED")
    assert MlflowClient(local_tracking).get_run(run.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_disk_full_while_logging_the_model_is_one_line_and_the_run_ends_failed(tiny_ucf, tmp_path, kdhar_cli):
    # The logged model goes to a disk with no room for it (the store and the run's other files have
    # room): three chained tracebacks, and MLflow's own attempt to mark the model FAILED failed too.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    client.create_experiment("model-full", artifact_location=str(tmp_path / "artifacts"))
    with small_disk(tmp_path / "artifacts" / "models", "8k") as models:
        out = kdhar_cli("train-teacher", "--arch", "tiny3d", "--root", tiny_ucf, "--epochs", "1", *TINY_OPTS,
                        "--experiment", "model-full", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": store})
        lines = error_lines(out.stderr)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert len(lines) == 1, out.stderr
        (run,) = client.search_runs([client.get_experiment_by_name("model-full").experiment_id])
        assert run.info.status == "FAILED"
        assert lines[0].startswith(f"Error: disk full at {models}/")
        assert f"the model of run {run.info.run_id} was not logged (its partial files were removed)" in lines[0]
        assert f"--resume runs/checkpoints/{run.info.run_id}/last.pt" in lines[0]
        assert [p for p in models.rglob("*") if p.is_file()] == []  # nothing half-written left on the full disk


def test_a_store_that_cannot_be_created_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    # SQLite's "database or disk is full" from MLflow's schema set-up reached the command line as
    # SQLAlchemy's and MLflow's chained tracebacks.
    import logging

    from kdhar.cli import RAISED_ANYWAY_LOGGERS, main

    for name in RAISED_ANYWAY_LOGGERS:  # the command quietens them for the rest of this process
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    with small_disk(tmp_path / "disk", "256k") as disk:
        fill(disk)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{disk / 'mlflow.db'}")
        monkeypatch.setattr(sys, "argv", ["kdhar", "runs", "reconcile", "--experiment", "any"])
        with pytest.raises(SystemExit) as exited:
            main()
        err = capsys.readouterr().err
        assert exited.value.code == 1 and "Traceback" not in err, err
        assert err.strip().splitlines() == [
            "Error: disk full: a SQLite database (the MLflow store's mlflow.db or Optuna's optuna.db) could not be "
            "written; free space on its disk and run the command again"]
