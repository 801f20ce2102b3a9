"""End-to-end training runs: a teacher logged to a real MLflow server on PostgreSQL, resume after a
kill, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from kdhar import tracking
from kdhar.checkpoint import load_checkpoint
from kdhar.config import ClipConfig, DataConfig, ModelConfig, OptimConfig, RunConfig
from kdhar.data.synthetic import SynthSpec, generate
from kdhar.models import build_model
from kdhar.train import clock_text, run_training, stage_epochs

KDHAR = [sys.executable, "-m", "kdhar.cli"]
TINY_OPTS = ["--width", "4", "--clip-len", "4", "--crop", "32", "--num-workers", "0", "--batch-size", "8"]


@pytest.fixture(scope="session")
def tiny_ucf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "ucf101"
    generate(root, "ucf101", SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=12, size=(48, 64), seed=1))
    return root


def tiny_config(root: Path, epochs: int = 2, arch: str = "tiny3d") -> RunConfig:
    return RunConfig(
        data=DataConfig(root=str(root), num_workers=0, val_fraction=0.2),
        clip=ClipConfig(clip_len=4, frame_interval=2, test_clips=2, resize=(40, 53), crop=32),
        model=ModelConfig(arch=arch, width=4),
        optim=OptimConfig(epochs=epochs, batch_size=8),
    )


def test_stage_epochs_follow_the_paper_fractions():
    assert stage_epochs(200) == {"early": 50, "mid": 150, "late": 200}
    assert stage_epochs(12) == {"early": 3, "mid": 9, "late": 12}
    assert stage_epochs(1) == {"early": 1, "mid": 1, "late": 1}


@pytest.mark.slow
def test_teacher_run_logs_everything_to_the_server(server_tracking, tiny_ucf, tmp_path):
    cfg = tiny_config(tiny_ucf, epochs=2)
    res = run_training(cfg, role="teacher", experiment="e2e-teacher", workdir=tmp_path, progress=False)

    client = MlflowClient(server_tracking)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.01" and run.data.params["model.arch"] == "tiny3d"
    assert run.data.tags["role"] == "teacher" and run.data.tags["dataset_fingerprint"]
    curve = client.get_metric_history(res.run_id, "test_video_top1")
    assert [m.step for m in curve] == [1, 2]
    assert {"acc_early", "acc_mid", "acc_late", "final_test_video_top1"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"confusion_matrix.png", "learning_curves.png", "per_class_report.json", "classes.json", "config.json"} <= artifacts

    # The registered champion loads and computes what the trained weights compute.
    loaded = tracking.load_model("models:/kdhar-teacher-tiny3d@champion")
    state = load_checkpoint(tmp_path / "checkpoints" / res.run_id / "last.pt")
    model = build_model("tiny3d", 3, width=4)
    model.load_state_dict(state["model"])
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 4, 32, 32), dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def _final_metrics(db: Path, run_id: str) -> dict[str, float]:
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    return {k: v for k, v in run.data.metrics.items() if k.startswith(("final_", "test_", "val_", "train_loss"))}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_ucf, tmp_path):
    """SIGKILL mid-training, then --resume: same MLflow run, same final metrics as an uninterrupted run."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # 8 epochs: on an idle machine 3 tiny epochs once ended between the first checkpoint and the kill.
    args = [*KDHAR, "train-teacher", "--arch", "tiny3d", "--root", str(tiny_ucf), "--epochs", "8", *TINY_OPTS]

    whole = subprocess.run([*args, "--experiment", "whole"], cwd=tmp_path / ".", env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    whole_id = whole.stdout.split("run ")[1].split(":")[0]

    work = tmp_path / "killed"
    work.mkdir()
    env_k = {**env, "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}
    proc = subprocess.Popen([*args, "--experiment", "killed"], cwd=work, env=env_k, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        found = list((work / "runs" / "checkpoints").glob("*/last.pt"))
        if found and load_checkpoint(found[0])["epoch"] >= 1:
            ckpt = found[0]
            break
        time.sleep(0.2)
    assert ckpt is not None, "the run finished or failed before a checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(ckpt)["epoch"] < 8

    resumed = subprocess.run([*args, "--experiment", "killed", "--resume", str(ckpt)], cwd=work, env=env_k, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    resumed_id = resumed.stdout.split("run ")[1].split(":")[0]
    assert resumed_id == ckpt.parent.name  # the same MLflow run was continued

    whole_m = _final_metrics(tmp_path / "mlflow.db", whole_id)
    resumed_m = _final_metrics(tmp_path / "mlflow.db", resumed_id)
    assert whole_m.keys() == resumed_m.keys()
    for key, value in whole_m.items():
        assert resumed_m[key] == pytest.approx(value, abs=1e-6), key


def test_resume_refuses_a_changed_configuration_and_a_finished_run(tiny_ucf, tmp_path, kdhar_cli):
    # Resuming used to reopen a finished run, train on with other settings (--lr ignored, half the
    # data) and leave params saying the old values.
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # --stage-models: a supervised run keeps its stages' models only when asked.
    args = ["train-teacher", "--arch", "tiny3d", "--root", str(tiny_ucf), "--epochs", "2", *TINY_OPTS,
            "--experiment", "resume", "--stage-models", "true"]
    first = kdhar_cli(*args, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    run_id = first.stdout.split("run ")[1].split(":")[0]
    tags = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id).data.tags
    # 2 epochs: early is epoch 1, a model of its own; mid and late are the last epoch, the run's model.
    assert tags["stage_model_early"].startswith("models:/") and tags["stage_model_early"] != tags["model_uri"]
    assert tags["stage_model_mid"] == tags["stage_model_late"] == tags["model_uri"]
    ckpt = tmp_path / "runs" / "checkpoints" / run_id / "last.pt"

    def resume(*extra: str) -> subprocess.CompletedProcess:
        return kdhar_cli(*args, "--resume", ckpt, *extra, cwd=tmp_path, env=env)

    changed = resume("--lr", "0.5", "--fraction", "0.5")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    line = changed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: --resume {ckpt}: the run was trained with other settings")
    assert "data.fraction 1.0 -> 0.5" in line and "optim.lr 0.02 -> 0.5" in line
    assert line.endswith("; only optim.epochs, optim.threads may change (with --allow-config-change true)")
    done = resume()
    assert done.returncode == 2 and f"run {run_id} already trained all 2 epochs" in done.stderr
    assert "to train it longer: --epochs 3 or more with --allow-config-change true" in done.stderr
    longer = resume("--epochs", "3")
    assert longer.returncode == 2 and longer.stderr.strip().endswith("; add --allow-config-change true to accept this")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).info.status == "FINISHED" and len(client.get_metric_history(run_id, "val_loss")) == 2

    # Trained longer, the run says so where MLflow allows: the params keep the first values (MLflow
    # never changes one), the tags, config.json, description and stage metrics have the new ones.
    allowed = resume("--epochs", "5", "--allow-config-change", "true")
    assert allowed.returncode == 0, allowed.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_with_changes"] == "optim.epochs 2 -> 5"
    assert run.data.tags["epochs"] == "5" and run.data.params["optim.epochs"] == "2"
    assert "5 epochs" in run.data.tags["mlflow.note.content"]
    config = json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path))).read_text())
    assert config["optim.epochs"] == 5
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2, 3, 4, 5]
    test_acc = {m.step: m.value for m in client.get_metric_history(run_id, "test_video_top1")}
    # The early stage of 5 epochs is epoch 2, which the first attempt trained: logged again from its history.
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "acc_early")] == [(1, test_acc[1]), (2, test_acc[2])]
    assert run.data.metrics["acc_early"] == test_acc[2] and run.data.metrics["acc_late"] == test_acc[5]
    # Early is now epoch 2, trained before the resume: no model of its own; mid (epoch 4) has one.
    assert run.data.tags["stage_model_early"] == "none: epoch 2 was trained before the run was resumed with 5 epochs"
    assert run.data.tags["stage_model_mid"].startswith("models:/") and run.data.tags["stage_model_mid"] != tags["model_uri"]
    assert run.data.tags["stage_model_late"] == run.data.tags["model_uri"] != tags["model_uri"]


def checkpointed_epoch(cfg: RunConfig, workdir: Path, role: str, teacher=None) -> Path:
    """One real epoch of a `role` run (a teacher or a student of `teacher`), checkpointed by the run's
    own listener; the tracker records nothing, so no store is needed. Returns its last.pt."""
    from kdhar.distributed import NullTracker
    from kdhar.objectives import build_objective
    from kdhar.training.listeners.checkpoints import Checkpointer
    from kdhar.training.loop import EpochLoop
    from kdhar.training.prepare import prepare

    prep = prepare(cfg, role=role, objective=build_objective(cfg, teacher), progress=False)
    run_id = f"{role}-{len(list(workdir.glob('checkpoints/*')))}"
    EpochLoop(prep, [Checkpointer(workdir)]).run(NullTracker(run_id))
    return workdir / "checkpoints" / run_id / "last.pt"


def random_teacher(classes: list[str], uri: str, run_id: str):
    """A frozen tiny3d teacher of random weights that says it came from `uri` (run `run_id`)."""
    from kdhar.train import Teacher

    return Teacher(model=build_model("tiny3d", len(classes), width=4).eval(), uri=uri, classes=classes,
                   arch="tiny3d", run_id=run_id)


@pytest.fixture(scope="session")
def resumable(tiny_ucf, tmp_path_factory) -> dict:
    """A one-epoch KD student of teacher run A and a one-epoch teacher, each checkpointed."""
    from kdhar.train import load_splits

    cfg = tiny_config(tiny_ucf, epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fraction=0.25))  # 12 videos: an epoch in ~1 s
    classes = load_splits(cfg).classes
    teacher_a = random_teacher(classes, "runs:/aaaa", "aaaa")
    work = tmp_path_factory.mktemp("resumable")
    return {"cfg": cfg, "classes": classes, "teacher_a": teacher_a,
            "kd": checkpointed_epoch(cfg, work, "student", teacher_a), "teacher": checkpointed_epoch(cfg, work, "teacher")}


def test_resume_refuses_another_teacher_role_or_method_in_one_line(resumable):
    # A KD checkpoint resumed silently with another teacher; with --teacher none it trained an epoch
    # without KD and then crashed; a teacher's checkpoint resumed as a student.
    from kdhar.objectives import build_objective
    from kdhar.train import ResumeError
    from kdhar.training.prepare import prepare

    cfg, kd, teacher_ckpt = resumable["cfg"], resumable["kd"], resumable["teacher"]
    teacher_b = random_teacher(resumable["classes"], "models:/kdhar-teacher-tiny3d@champion-x", "bbbb")

    def refusal(checkpoint: Path, role: str, teacher) -> str:
        with pytest.raises(ResumeError) as info:
            prepare(cfg, role=role, objective=build_objective(cfg, teacher), resume=str(checkpoint), progress=False)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"--resume {checkpoint}: the checkpoint is of another kind of run (")
        return message

    none = refusal(kd, "student", None)
    assert "(method kd-logit -> supervised, teacher runs:/aaaa -> none)" in none
    assert "continue it with kdhar distill --teacher runs:/aaaa and the options that trained it (method kd-logit)" in none
    other = refusal(kd, "student", teacher_b)
    assert "(teacher runs:/aaaa -> models:/kdhar-teacher-tiny3d@champion-x (run bbbb))" in other
    as_teacher = refusal(kd, "teacher", None)
    assert "(role student -> teacher, method kd-logit -> supervised, teacher runs:/aaaa -> none)" in as_teacher
    as_student = refusal(teacher_ckpt, "student", resumable["teacher_a"])
    assert "(role teacher -> student, method supervised -> kd-logit, teacher none -> runs:/aaaa)" in as_student
    assert "continue it with kdhar train-teacher and the options" in as_student
    assert load_checkpoint(kd)["identity"] == {"role": "student", "method": "kd-logit", "teacher_uri": "runs:/aaaa",
                                               "teacher_run_id": "aaaa"}


def test_more_epochs_on_resume_rebuild_the_schedule_and_each_refusal_hints_what_is_accepted(resumable):
    # The refusal's hint was inverted (--allow-config-change offered for a change it cannot accept,
    # "only ... may change" for one it can), and a run given more epochs took its first step at the
    # restored lr of the old schedule's end (0 for cosine).
    from kdhar.engine import get_lr
    from kdhar.objectives import build_objective
    from kdhar.train import ResumeError, check_resume
    from kdhar.training.prepare import prepare
    from kdhar.training.resume import run_identity

    cfg, kd = resumable["cfg"], str(resumable["kd"])
    # The same teacher run, named through the registry: the same teacher.
    teacher = random_teacher(resumable["classes"], "models:/kdhar-teacher-tiny3d@champion-x", "aaaa")
    teacher.model.load_state_dict(resumable["teacher_a"].model.state_dict())

    def with_optim(**changes) -> RunConfig:
        return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **changes))

    def resume(run_cfg: RunConfig, allow: bool):
        return prepare(run_cfg, role="student", objective=build_objective(run_cfg, teacher), resume=kd,
                       allow_config_change=allow, progress=False)

    with pytest.raises(ResumeError, match=r"\(optim.epochs 1 -> 2\); .*; add --allow-config-change true to accept this$"):
        resume(with_optim(epochs=2), allow=False)
    with pytest.raises(ResumeError, match=r"\(optim.epochs 1 -> 2, optim.lr 0.01 -> 0.5\); .*; only optim.epochs, "
                                          r"optim.threads may change \(with --allow-config-change true\)$"):
        resume(with_optim(epochs=2, lr=0.5), allow=False)

    prep = resume(with_optim(epochs=2), allow=True)
    assert prep.changed == {"optim.epochs": (1, 2)} and prep.start_epoch == 1
    steps = len(prep.train_loader)
    done = prep.optimisers.scheduler.last_epoch
    assert done == steps  # one epoch of steps behind it
    expected = get_lr(done, 2 * steps, cfg.optim.lr, cfg.optim.schedule, round(cfg.optim.warmup * steps))
    assert expected > 0 and prep.optimisers.net.param_groups[0]["lr"] == pytest.approx(expected)
    # Fewer epochs than the checkpoint has trained: refused whatever else is allowed.
    state = {**load_checkpoint(kd), "epoch": 3}
    with pytest.raises(ResumeError, match="has trained 3 epochs, more than --epochs 2: give --epochs 3 or more$"):
        check_resume(kd, state, with_optim(epochs=2), run_identity("student", build_objective(cfg, teacher)), True,
                     lambda: False)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--arch", "resnet9000"], "resnet9000"),
        (["--root", "/nonexistent/videos"], "/nonexistent/videos"),
        (["--fraction", "1.5"], "1.5"),
        (["--epochs", "two"], "two"),
        (["--lr", "inf"], "lr=inf: must be a finite number > 0"),
        (["--epochs", "0"], "epochs=0: must be at least 1"),
        (["--size", "paper", "--crop", "500"], "crop=500: must fit in the 128x171 frames"),
        # At --size cpu the resize follows the crop, so the crop is held to the videos' own frames.
        (["--crop", "100"], "crop=100: larger than the 48x64 frames of the videos"),
        (["--device", "bogus"], "--device bogus: not a device"),
    ],
)
def test_bad_input_is_one_clear_line(extra, expected, tiny_ucf, tmp_path, monkeypatch, capsys):
    # The console entry point in this process (a new interpreter per case cost 5-8 s of imports):
    # an exception it does not turn into a one-line error propagates here and fails the test.
    from kdhar.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kdhar", "train-teacher", "--root", str(tiny_ucf), *TINY_OPTS, *extra])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and expected in err
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1, err
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_unreachable_server_is_a_clear_error(tiny_ucf, tmp_path, kdhar_cli):
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    out = kdhar_cli("train-teacher", "--arch", "tiny3d", "--root", tiny_ucf, *TINY_OPTS, cwd=tmp_path, env=env)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "127.0.0.1:9" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_piped_run_prints_one_line_per_epoch_with_elapsed_and_remaining(tiny_ucf, tmp_path, kdhar_cli):
    # Output sent to a file or a pipe (a scheduler, `| tee`) gets no progress bar, so the epoch lines
    # alone tell how far the run is. `--augment` is given bare, followed by another option.
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = kdhar_cli("train-teacher", "--arch", "tiny3d", "--root", tiny_ucf, "--augment", "--epochs", "3", *TINY_OPTS,
                    "--experiment", "piped", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("[teacher tiny3d] epoch ")]
    assert [line.split()[3].rstrip(":") for line in lines] == ["1/3", "2/3", "3/3"]
    for line in lines:
        assert re.search(r", elapsed \d+:\d\d, remaining ~\d+:\d\d$", line), line
    assert lines[-1].endswith("remaining ~0:00")
    elapsed = [int(m) * 60 + int(s) for m, s in (re.search(r"elapsed (\d+):(\d\d)", line).groups() for line in lines)]
    assert elapsed == sorted(elapsed)
    run_id = out.stdout.split("run ")[1].split(":")[0]
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.data.params["clip.augment"] == "True"
    assert not any(k.startswith("stage_model_") for k in run.data.tags)  # stage models are PCL runs' default only


def test_clock_text_reads_minutes_then_hours():
    assert [clock_text(s) for s in (0, 36.4, 125, 3723)] == ["0:00", "0:36", "2:05", "1:02:03"]


def test_init_from_a_checkpoint_of_another_modality_is_refused(tmp_path):
    from kdhar.checkpoint import save_checkpoint
    from kdhar.distill import check_init_modality
    from kdhar.training.resume import stored_config

    # A checkpoint as kdhar writes it for a residual-frame run (a PCL encoder's input).
    cfg = RunConfig(model=ModelConfig(arch="tiny3d", width=4, modality="res"))
    model = build_model("tiny3d", 3, width=4, modality="res")
    path = tmp_path / "res.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": stored_config(cfg, kd=False), "epoch": 1})
    with pytest.raises(ValueError, match=r"--init .*res.pt was trained on res input but this run's modality is rgb: "
                                         r"pass --modality res"):
        check_init_modality(str(path), "rgb")
    check_init_modality(str(path), "res")  # the same modality starts from it
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        check_init_modality(str(tmp_path / "absent.pt"), "rgb")
