"""`kdhar experiment run SPEC --executor ray`: the grid's cells as Ray tasks on a local Ray instance,
in order, skipped once finished, and retried (resuming their run) when their worker process dies."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from kdhar.cli import cli
from tests.conftest import SEVERAL_PROCESSES
from tests.test_experiments import TINY, store, write_spec  # noqa: F401 - store is a fixture

pytestmark = SEVERAL_PROCESSES  # a local Ray instance of 2 CPUs, and deadlines on its tasks

# Four cells in three waves: the teacher, two scratch students side by side, one distilled student.
FOUR = {"teachers": ["tiny3d"], "students": ["tiny3d", "c3d"], "self_distill": False,
        "overrides": {**TINY, "threads": 1}}


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray instance of 2 CPUs, started from another folder and without the tracking URI in
    its environment, so a task reaches the grid's store and checkpoints only through what the
    driver passes it."""
    ray = pytest.importorskip("ray")
    elsewhere = tmp_path_factory.mktemp("ray-cwd")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.chdir(elsewhere)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        mp.undo()
    yield ray
    ray.shutdown()


def _experiment_run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["experiment", "run", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_ray_grid_trains_each_wave_after_the_one_it_needs_and_a_rerun_trains_nothing(ray_local, store):
    from mlflow import MlflowClient

    from kdhar import tracking

    spec = write_spec(store, "ray4.yaml", experiment="ray4", **FOUR)
    dry = _experiment_run(str(spec), "--dry-run")
    assert dry.strip().splitlines()[-1] == "0 done, 4 to train"

    out = _experiment_run(str(spec), "--executor", "ray")
    assert "(Ray on this machine: 2 CPUs, 0 GPUs)" in out and "4 trained, 0 already finished" in out
    runs = tracking.find_runs("ray4")
    assert len(runs) == 4 and all(r["status"] == "FINISHED" for r in runs)
    assert all(r["tags"].get("grid_task") for r in runs)  # trained by Ray tasks, not in this process
    assert all(int(r["tags"]["pid"]) != os.getpid() for r in runs)
    by_cell = {(r["tags"]["role"], r["tags"]["arch"], r["tags"]["teacher_arch"]): r for r in runs}
    teacher, kd = by_cell[("teacher", "tiny3d", "none")], by_cell[("student", "c3d", "tiny3d")]
    scratch = [by_cell[("student", "tiny3d", "none")], by_cell[("student", "c3d", "none")]]
    info = {r["run_id"]: MlflowClient().get_run(r["run_id"]).info for r in runs}
    assert all(info[s["run_id"]].start_time >= info[teacher["run_id"]].end_time for s in scratch)
    assert info[kd["run_id"]].start_time >= max(info[s["run_id"]].end_time for s in scratch)
    assert kd["tags"]["teacher_run_id"] == teacher["run_id"]
    # Checkpoints land in the driver's working directory (the store), pruned as the local executor does.
    assert set(info) <= {p.parent.name for p in (store / "runs" / "checkpoints").glob("*/best.pt")}
    assert not [p for p in (store / "runs" / "checkpoints").glob("*/last.pt") if p.parent.name in info]

    again = _experiment_run(str(spec), "--executor", "ray")
    assert "0 trained, 4 already finished" in again and again.count("skipped (already finished)") == 4
    assert len(tracking.find_runs("ray4")) == 4


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills a worker process by its pid")
def test_a_cell_whose_ray_worker_is_killed_is_retried_and_resumes_its_run(ray_local, store):
    """SIGKILL of the worker process training a cell, once its run has a checkpoint: Ray retries the
    task, the retry ends the dead attempt's run KILLED and continues that very run from its
    checkpoint; the grid ends with it FINISHED and nothing RUNNING."""
    from mlflow import MlflowClient

    from kdhar import tracking
    from kdhar.checkpoint import load_checkpoint
    from kdhar.experiments import run_grid
    from kdhar.experiments.executors.ray import RayExecutor

    exp, epochs = "ray-kill", 60
    spec = write_spec(store, "ray-kill.yaml", experiment=exp, teachers=["tiny3d"], students=["tiny3d"],
                      self_distill=False, overrides={**TINY, "epochs": epochs}, teacher_overrides={"epochs": 1})
    killed: dict[str, int] = {}

    def kill_the_student_worker() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for run in tracking.find_runs(exp, "tags.role = 'student' and attributes.status = 'RUNNING'"):
                path = store / "runs" / "checkpoints" / run["run_id"] / "last.pt"
                try:
                    epoch = load_checkpoint(path)["epoch"] if path.exists() else 0
                except Exception:  # noqa: BLE001 - being written
                    continue
                pid = int(run["tags"]["pid"])
                if 2 <= epoch < epochs - 10 and pid != os.getpid():
                    # As if it trained on another node: there its pid cannot be asked and its heartbeat
                    # is fresh for minutes, yet the retry must take the run for dead.
                    MlflowClient().set_tag(run["run_id"], "host", "another-node")
                    os.kill(pid, signal.SIGKILL)
                    killed.update(run_id=run["run_id"], pid=pid, epoch=epoch)
                    return
            time.sleep(0.3)

    killer = threading.Thread(target=kill_the_student_worker, daemon=True)
    killer.start()
    lines: list[str] = []
    outcomes = run_grid(spec, experiment=exp, log=lines.append, executor=RayExecutor(log=lines.append))
    killer.join(5)
    assert killed, f"the student's worker was never seen mid-training: {lines}"
    student = outcomes[1]
    assert student.status == "done" and student.run_id == killed["run_id"]  # the same run, continued
    run = next(r for r in tracking.find_runs(exp) if r["run_id"] == killed["run_id"])
    assert run["status"] == "FINISHED" and int(run["tags"]["pid"]) != killed["pid"]  # finished by the retry
    # Resumed from its checkpoint: the epochs trained before the kill are not trained again (the last
    # metrics of the killed attempt may never have been sent), the retry trained the rest.
    steps = [step for step, _ in tracking.metric_history(killed["run_id"], "train_loss")]
    assert all(steps.count(s) <= 1 for s in range(1, killed["epoch"] + 1)), steps
    assert set(range(killed["epoch"] + 2, epochs + 1)) <= set(steps) <= set(range(1, epochs + 1))
    assert tracking.find_runs(exp, "attributes.status = 'RUNNING'") == []
    assert [r["status"] for r in tracking.find_runs(exp)] == ["FINISHED", "FINISHED"]


def test_executor_options_are_refused_where_they_do_not_apply(tmp_path, monkeypatch):
    spec = tmp_path / "s.yaml"
    spec.write_text("experiment: e\n")
    runner = CliRunner()

    def refused(*args: str) -> str:
        result = runner.invoke(cli, ["experiment", "run", str(spec), *args])
        assert result.exit_code == 2, result.output
        return result.output.strip().splitlines()[-1]

    assert "--address is the Ray cluster of --executor ray" in refused("--address", "auto")
    assert "--workers is for --executor local" in refused("--executor", "ray", "--workers", "2")
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    monkeypatch.delitem(sys.modules, "kdhar.experiments.executors.ray", raising=False)
    assert refused("--executor", "ray") == "Error: --executor ray needs Ray: pip install kdhar[ray]"


@pytest.mark.slow  # a kdhar process of its own: on 2 busy cores its start-up takes most of the time
def test_an_address_where_something_else_listens_is_one_line_within_seconds(ray_local, tmp_path):
    import socket
    import subprocess

    from kdhar.experiments.executors.ray import _check_reachable

    # A real head's GCS answers the greeting: the check lets it through.
    _check_reachable(ray_local.get_runtime_context().gcs_address)
    # A plain TCP listener that is not Ray: ray.init would wait on it for minutes.
    (tmp_path / "videos").mkdir()
    spec = tmp_path / "grid.yaml"
    spec.write_text(f"experiment: e\ndataset: {{name: ucf101, root: {tmp_path / 'videos'}}}\nteachers: [tiny3d]\n"
                    "students: [tiny3d]\nfractions: [1.0]\nseeds: [0]\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        done = subprocess.run([sys.executable, "-m", "kdhar.cli", "experiment", "run", str(spec), "--executor", "ray",
                               "--address", address], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: no Ray cluster at --address {address}: something listens at {address} but does not answer as a "
        "Ray head (a gRPC server) within 5 s; start one with `ray start --head` (docs/scaling.md) or leave out "
        "--address for a local one")


def test_an_address_where_no_ray_answers_is_one_line_at_once(monkeypatch):
    ray_executor = pytest.importorskip("kdhar.experiments.executors.ray")
    monkeypatch.setattr(ray_executor.ray, "is_initialized", lambda: False)  # whatever this process started
    monkeypatch.setattr(ray_executor.ray, "init", lambda **_: pytest.fail("ray.init would retry for minutes"))
    started = time.monotonic()
    with pytest.raises(ray_executor.RayClusterError, match=r"no Ray cluster at --address 127.0.0.1:1: .*ray start --head"):
        ray_executor.RayExecutor("127.0.0.1:1").start()
    assert time.monotonic() - started < 15
