"""kdhar.tracking against a real `mlflow server` on PostgreSQL, and against a local SQLite store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless CI
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Param

from kdhar import tracking
from kdhar.tracking import RunTracker, TrackingError, TrackingUnavailableError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def tiny_video_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Dropout makes the output differ in train mode, so equal outputs prove eval-mode export.
    return torch.nn.Sequential(
        torch.nn.Conv3d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(4, 5),
    )


def clip_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 4, 16, 16), dtype=np.float32)


def test_run_logs_params_metrics_and_artifacts(server_tracking, tmp_path):
    tags = tracking.standard_tags("teacher", "c3d", "ucf101", "fp0001")
    long_value = "x" * 7000
    with RunTracker("kdhar-test-logging", run_name="logging", tags=tags) as run:
        run.log_params({"optim.lr": 0.01, "model.width": 8, "note": long_value})
        for step in range(600):
            run.log_metrics({"train.loss": 1.0 / (step + 1), "train.acc": step / 600}, step=step)
        run.set_tags({"stage": "done"})
        run.log_text("hello", "notes/hello.txt")
        run.log_dict({"a": 1}, "summary.json")
        assert tracking.load_run_dict(run.run_id, "summary.json") == {"a": 1}
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        run.log_figure(fig, "plots/curve.png")
        plt.close(fig)
        (tmp_path / "confusion.csv").write_text("1,0\n0,1\n")
        run.log_artifact(tmp_path / "confusion.csv", artifact_path="eval")
        run_id = run.run_id

    client = MlflowClient(server_tracking)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["optim.lr"] == "0.01"
    assert got.data.params["model.width"] == "8"
    assert len(got.data.params["note"]) <= 6000 and got.data.params["note"].startswith("xxx")
    assert {k: got.data.tags[k] for k in ("role", "arch", "dataset", "dataset_fingerprint")} == {
        "role": "teacher", "arch": "c3d", "dataset": "ucf101", "dataset_fingerprint": "fp0001",
    }  # fmt: skip
    assert got.data.tags["stage"] == "done"
    history = client.get_metric_history(run_id, "train.loss")
    assert sorted(m.step for m in history) == list(range(600))
    assert {m.step: m.value for m in history}[9] == pytest.approx(0.1)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"notes", "summary.json", "plots", "eval", "params.json"} <= artifacts
    local = Path(client.download_artifacts(run_id, "eval/confusion.csv", str(tmp_path / "dl")))
    assert local.read_text() == "1,0\n0,1\n"


def test_model_registry_and_champion_rule(server_tracking):
    name = "kdhar-test-teacher"
    versions = {}
    # (label, dataset fingerprint, test accuracy) in logging order
    plan = [("a1", "dsA", 0.50), ("a2", "dsA", 0.40), ("b1", "dsB", 0.90), ("a3", "dsA", 0.70)]
    models = {}
    moved = {}
    for i, (label, fingerprint, acc) in enumerate(plan):
        tags = tracking.standard_tags("teacher", "tiny", "synthetic", fingerprint)
        with RunTracker("kdhar-test-registry", run_name=label, tags=tags) as run:
            models[label] = tiny_video_model(seed=i)
            run.log_metrics({"test.video_top1": acc}, step=0)
            ref = run.log_model(models[label], "model", clip_batch(2), registered_name=name)
            versions[label] = ref.version
            moved[label] = run.promote_champion(name, ref.version, "test.video_top1", fingerprint)

    assert moved == {
        "a1": ["champion-dsA", "champion"],
        "a2": [],  # worse than a1 on the same data
        "b1": ["champion-dsB"],  # other dataset: `champion` stays with dsA
        "a3": ["champion-dsA", "champion"],
    }
    client = MlflowClient(server_tracking)
    aliases = client.get_registered_model(name).aliases
    assert aliases == {
        "champion": versions["a3"], "champion-dsA": versions["a3"], "champion-dsB": versions["b1"],
    }  # fmt: skip
    assert client.get_model_version(name, versions["b1"]).tags["dataset_fingerprint"] == "dsB"

    with pytest.raises(TrackingError, match="dataset_fingerprint=dsA"):
        tracking.promote_champion(name, versions["a2"], "test.video_top1", "dsB")

    loaded = tracking.load_model(f"models:/{name}@champion", device="cpu")
    loaded.eval()  # callers freeze teachers this way; must not raise
    x = torch.from_numpy(clip_batch(3, seed=1))  # another batch size than logged
    with torch.no_grad():
        expected = models["a3"].eval()(x)
        assert torch.allclose(loaded(x), expected, atol=1e-6)
        b1_run = client.get_model_version(name, versions["b1"]).run_id
        by_run = tracking.load_model(f"runs:/{b1_run}")
        assert torch.allclose(by_run(x), models["b1"].eval()(x), atol=1e-6)

    # Helpers other modules resolve teachers with.
    assert tracking.champion_uri(name, "dsB") == f"models:/{name}@champion-dsB"
    assert tracking.champion_uri(name, "dsC") is None
    assert tracking.champion_uri("kdhar-test-unregistered", "dsA") is None
    assert tracking.model_run_id(f"models:/{name}@champion-dsB") == b1_run
    assert tracking.model_run_id(f"models:/{name}/{versions['b1']}") == b1_run
    assert tracking.run_tags(b1_run)["dataset_fingerprint"] == "dsB"
    assert tracking.metric_history(b1_run, "test.video_top1") == [(0, 0.9)]
    tracking.log_metrics_to(b1_run, {"extra": 3.0})
    assert tracking.run_status(b1_run) == "FINISHED" and tracking.run_params(b1_run) == {}
    assert tracking.metric_history(b1_run, "extra") == [(0, 3.0)]
    tracking.end_run_as(b1_run, "KILLED")
    assert tracking.run_status(b1_run) == "KILLED"
    assert tracking.experiment_exists("kdhar-test-registry")
    assert not tracking.experiment_exists("kdhar-test-missing")


def test_body_that_raises_ends_failed(server_tracking):
    with pytest.raises(ValueError, match="boom"):
        with RunTracker("kdhar-test-status") as run:
            run.log_metrics({"loss": 1.0}, step=0)
            raise ValueError("boom")
    got = MlflowClient(server_tracking).get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert [m.value for m in MlflowClient(server_tracking).get_metric_history(run.run_id, "loss")] == [1.0]


def test_sigterm_ends_run_killed(server_tracking):
    script = textwrap.dedent(
        """
        import time
        from kdhar.tracking import RunTracker
        with RunTracker("kdhar-test-status", run_name="sigterm") as run:
            print(run.run_id, flush=True)
            step = 0
            while True:
                run.log_metrics({"loss": 1.0}, step=step)
                step += 1
                time.sleep(0.02)
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": server_tracking}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        run_id = proc.stdout.readline().strip()
        assert re.fullmatch(r"[0-9a-f]{32}", run_id), proc.stderr.read()
        time.sleep(0.5)  # let it log a few steps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    client = MlflowClient(server_tracking)
    assert client.get_run(run_id).info.status == "KILLED"
    assert len(client.get_metric_history(run_id, "loss")) > 0


def test_signal_handler_restored_after_run(server_tracking):
    before = signal.getsignal(signal.SIGTERM)
    with RunTracker("kdhar-test-status"):
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def test_unreachable_server_fails_fast(monkeypatch):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket closes
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as err:
        with RunTracker("never"):
            pass
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message
    assert f"MLflow tracking server at {uri} is not reachable" in message
    assert "docker compose up" in message and "MLFLOW_TRACKING_URI" in message


def test_resume_reopens_the_same_run(server_tracking):
    with RunTracker("kdhar-test-resume", run_name="first") as run:
        run.log_params({"optim.lr": 0.01})
        run.log_metrics({"loss": 2.0}, step=0)
        first_id = run.run_id
    with RunTracker("kdhar-test-resume", resume_run_id=first_id) as run:
        assert run.run_id == first_id
        assert MlflowClient(server_tracking).get_run(first_id).info.status == "RUNNING"
        run.log_params({"optim.lr": 0.01})  # same values are fine on resume
        run.log_metrics({"loss": 1.0}, step=1)
        with pytest.raises(TrackingError, match=r"optim.lr \(0.01 -> 0.02\)"):
            run.log_params({"optim.lr": 0.02})
    client = MlflowClient(server_tracking)
    assert client.get_run(first_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(first_id, "loss")] == [(0, 2.0), (1, 1.0)]
    with pytest.raises(TrackingError, match="its own experiment name"):
        with RunTracker("kdhar-test-other", resume_run_id=first_id):
            pass


def test_default_uri_is_mlflow_db_in_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_local_store_nested_runs_and_find_runs(local_tracking):
    with RunTracker("kdhar-test-local", run_name="study", tags={"role": "study"}) as parent:
        for trial in range(2):
            with RunTracker("kdhar-test-local", run_name=f"trial-{trial}", nested=True,
                            tags={"role": "trial"}) as child:  # fmt: skip
                child.log_params({"kd.tau": 2.0 + trial})
                child.log_metrics({"val.top1": 0.5 + trial / 10}, step=0)
    runs = tracking.find_runs("kdhar-test-local", "tags.role = 'trial'", order_by=["metrics.`val.top1` DESC"])
    assert [r["run_name"] for r in runs] == ["trial-1", "trial-0"]
    assert runs[0]["params"] == {"kd.tau": "3.0"}
    assert runs[0]["metrics"] == {"val.top1": pytest.approx(0.6)}
    assert runs[0]["status"] == "FINISHED"
    assert runs[0]["tags"]["mlflow.parentRunId"] == parent.run_id
    assert tracking.find_runs("no-such-experiment") == []


def test_the_project_run_of_mlflow_run_is_the_named_run(local_tracking, monkeypatch):
    """As `mlflow run` hands its run over (MLFLOW_RUN_ID, raw entry-point strings as params, filed
    under Default): kdhar's run is that run, named and tagged, with no parent; a nested run made
    meanwhile is a new run; an explicit other experiment is refused with the flag to add."""
    client = MlflowClient(local_tracking)
    default = client.get_experiment_by_name("Default").experiment_id
    project = client.create_run(default, tags={"mlflow.source.type": "PROJECT"}).info.run_id
    client.log_batch(project, params=[Param("device", "auto"), Param("epochs", "1")])
    monkeypatch.setenv("MLFLOW_RUN_ID", project)

    assert tracking.resolve_experiment(None) == ("Default", tracking.resolve_experiment(None)[1])
    assert "experiment 'Default'" in tracking.resolve_experiment(None)[1]
    assert "--experiment-name" in tracking.resolve_experiment(None)[1]
    assert tracking.resolve_experiment("Default") == ("Default", None)
    with pytest.raises(tracking.ExperimentMismatchError, match="add --experiment-name kdhar to the mlflow run command"):
        tracking.resolve_experiment("kdhar")

    with RunTracker("Default", run_name="kd-c3d→tiny3d-f1-s0",
                    tags={"role": "student", "mlflow.note.content": "Student tiny3d"}) as run:
        with RunTracker("Default", run_name="inner", nested=True) as inner:
            pass
        run.log_params({"device": "cpu", "optim.epochs": 1})
    assert run.run_id == project and inner.run_id != project
    adopted = client.get_run(project)
    assert adopted.info.run_name == "kd-c3d→tiny3d-f1-s0" and adopted.info.status == "FINISHED"
    assert adopted.data.tags["role"] == "student" and adopted.data.tags["mlflow.note.content"] == "Student tiny3d"
    assert "mlflow.parentRunId" not in adopted.data.tags
    # The raw string stays; kdhar's own value beside it, where they differ.
    assert adopted.data.params == {"device": "auto", "epochs": "1", "device.used": "cpu", "optim.epochs": "1"}
    assert "MLFLOW_RUN_ID" not in os.environ  # adopted once: later runs of the process are runs of their own
    assert tracking.resolve_experiment(None) == ("kdhar", None)


def test_sigterm_inside_a_finalizer_still_ends_the_run_killed(local_tracking, capfd):
    """Python drops an exception raised in __del__ (decord frees its readers there): the signal
    must not be lost with it."""
    from kdhar.tracking import RunTerminated

    def free_handle():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs between these bytecodes, under __del__
            pass

    class Reader:
        def __del__(self):
            free_handle()

    with pytest.raises(RunTerminated):
        with RunTracker("kdhar-test-local", run_name="finalizer") as run:
            Reader()  # dropped at once
            run.log_metrics({"loss": 1.0}, step=0)
            pytest.fail("the SIGTERM received in __del__ was lost")
    assert tracking.run_status(run.run_id) == "KILLED"
    assert "Exception ignored" not in capfd.readouterr().err


def test_only_a_finished_runs_model_is_registered(local_tracking):
    tags = tracking.standard_tags("teacher", "tiny", "synthetic", "fp")
    with pytest.raises(RuntimeError):
        with RunTracker("kdhar-test-register", run_name="failed", tags=tags) as run:
            failed = run.log_model(tiny_video_model(seed=0), "failed", clip_batch(2))
            raise RuntimeError("the run dies after logging its model")
    with pytest.raises(TrackingError, match=f"run {failed.run_id} is FAILED"):
        tracking.register_model(failed.model_uri, "kdhar-test-registered", failed.run_id)
    client = MlflowClient(local_tracking)
    assert not client.search_model_versions("name = 'kdhar-test-registered'")

    with RunTracker("kdhar-test-register", run_name="done", tags=tags) as run:
        done = run.log_model(tiny_video_model(seed=1), "done", clip_batch(2))
    version = tracking.register_model(done.model_uri, "kdhar-test-registered", done.run_id)
    mv = client.get_model_version("kdhar-test-registered", version)
    assert mv.run_id == done.run_id and mv.tags["role"] == "teacher" and mv.tags["dataset_fingerprint"] == "fp"


def test_local_store_failed_run(local_tracking):
    with pytest.raises(KeyboardInterrupt):
        with RunTracker("kdhar-test-local") as run:
            raise KeyboardInterrupt
    assert tracking.find_runs("kdhar-test-local")[0]["status"] == "KILLED"
    with pytest.raises(ValueError, match="batch of at least 2"):
        with RunTracker("kdhar-test-local") as run:
            run.log_model(tiny_video_model(0), "model", clip_batch(1))
    assert MlflowClient(local_tracking).get_run(run.run_id).info.status == "FAILED"


def test_git_commit(tmp_path):
    assert tracking.git_commit(tmp_path) is None
    commit = tracking.git_commit(REPO)
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}", commit)


@pytest.mark.parametrize(("uri", "message"), [
    ("bogus://host/x", "unknown scheme 'bogus'"),
    ("sqlite:////no/such/folder/mlflow.db", "folder /no/such/folder does not exist"),
    ("/no/such/folder/mlruns", "folder /no/such/folder does not exist"),
    ("postgresql://kdhar:hunter2@127.0.0.1:1/x", "does not answer: connection failed"),  # psycopg 3
    ("postgresql+psycopg2://postgres@127.0.0.1:1/x", "does not answer: connection to server at"),
])
def test_unusable_tracking_stores_fail_fast_in_one_line_without_the_password(uri, message):
    import time

    from kdhar.tracking import TrackingUnavailableError, check_server

    start = time.perf_counter()
    with pytest.raises(TrackingUnavailableError) as err:
        check_server(uri)
    assert message in str(err.value) and "hunter2" not in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 30  # MLflow's own client retries for about two minutes


def test_reachable_database_and_folder_stores_pass(postgres_db, tmp_path):
    from kdhar.tracking import check_server

    check_server(postgres_db)
    check_server(postgres_db.replace("postgresql+psycopg2://", "postgresql://"))  # psycopg 3, as MLflow's docs write it
    check_server(f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_server(str(tmp_path / "mlruns"))


class _WritesAFileWhenUnpickled(torch.nn.Module):
    """A model whose unpickling opens (so creates) `marker`: what a hostile author could log."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_serialised_models_are_refused_without_unpickling(local_tracking, tmp_path, kdhar_cli):
    import mlflow

    from kdhar.data.synthetic import SynthSpec, generate

    marker = tmp_path / "unpickled.txt"
    with mlflow.start_run() as run:
        # Explicit requirements: inferring them would load (unpickle) the model while logging.
        mlflow.pytorch.log_model(_WritesAFileWhenUnpickled(marker), name="model",
                                 serialization_format="pickle", pip_requirements=["torch"])
    assert not marker.exists()
    root = tmp_path / "ucf101"
    generate(root, "ucf101", SynthSpec(num_classes=2, groups=3, clips_per_group=1, frames=8, size=(32, 32), seed=0))
    env = {"MLFLOW_TRACKING_URI": local_tracking,
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}  # what the user's environment may say
    uri = f"runs:/{run.info.run_id}/model"
    done = kdhar_cli("distill", "--teacher", uri, "--student", "tiny3d", "--root", root, "--num-workers", "0",
                     "--epochs", "1", env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"Error: {uri} is pickle-serialised") and "serialization_format='pt2'" in lines[0]
    assert not marker.exists()
    with pytest.raises(TrackingError, match="pickle-serialised"):
        tracking.load_model(uri)
    assert not marker.exists()

    # The logged file really runs code when unpickled.
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    torch.load(local / "data" / "model.pth", weights_only=False)
    assert marker.exists()


def test_a_pt2_archive_carrying_a_pickle_is_refused_and_kdhars_own_model_loads(local_tracking, tmp_path):
    """torch.export.load unpickles an archive's records: one record with a pickled call is enough."""
    import pickle
    import shutil
    import zipfile

    import mlflow

    with RunTracker("kdhar-test-safe", run_name="pt2") as run:
        ref = run.log_model(tiny_video_model(seed=0), "model", clip_batch(2))
    x = torch.from_numpy(clip_batch(2))
    with torch.no_grad():
        assert torch.allclose(tracking.load_model(ref.model_uri)(x), tiny_video_model(seed=0).eval()(x), atol=1e-6)

    marker = tmp_path / "unpickled.txt"
    model_dir = tmp_path / "hostile"
    shutil.copytree(mlflow.artifacts.download_artifacts(artifact_uri=ref.model_uri), model_dir)
    with zipfile.ZipFile(model_dir / "data" / "model.pt2", "a") as archive:
        [top] = {name.split("/", 1)[0] for name in archive.namelist()}
        archive.writestr(f"{top}/data/constants/extra.pt", pickle.dumps(_WritesAFileWhenUnpickled(marker)))
    with mlflow.start_run() as hostile:
        mlflow.log_artifacts(str(model_dir), "model")
    uri = f"runs:/{hostile.info.run_id}/model"
    with pytest.raises(TrackingError, match="holds pickled objects") as refused:
        tracking.load_model(uri)
    assert "\n" not in str(refused.value) and "serialization_format='pt2'" in str(refused.value)
    assert not marker.exists()


def test_commands_starting_together_on_a_new_sqlite_store_all_open_it(tmp_path):
    # Without the lock on <db>.lock, 3 of 4 such processes failed in MLflow's schema migration.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "from kdhar import tracking; tracking._client().search_experiments(max_results=1)"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[-500:] for o in outs]
