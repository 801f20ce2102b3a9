"""The README's `mlflow run` lines, run as a new user types them (no --experiment-name; tiny-size
parameters added) in a fresh store: each run lands in `Default`, where `mlflow run` files it, as the
top-level run kdhar names (the project run itself, not a parent of it), and `kdhar report` without
--experiment finds them."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kdhar.data.synthetic import SynthSpec, generate

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "Default"  # where `mlflow run` files a run without --experiment-name
# Tiny-size parameters added to each README line (entry point -> -P values).
TINY = {"width": "4", "epochs": "1", "clip_len": "4", "crop": "32", "num_workers": "0", "batch_size": "8"}


def readme_lines() -> dict[str, list[str]]:
    """The README's `mlflow run . -e NAME ...` lines (the entry points section), by entry point."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Entry points", 1)[1].split("\n## ", 1)[0]
    lines = {}
    for line in section.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("mlflow run . -e"):
            argv = shlex.split(line)
            lines.setdefault(argv[4], []).append(argv)
    return lines


def with_params(argv: list[str], params: dict[str, str]) -> list[str]:
    """`argv` with its -P values replaced or added, and the project path made absolute."""
    out = [argv[0], argv[1], str(ROOT)] + argv[3:]
    for key, value in params.items():
        for i, arg in enumerate(out):
            if arg == "-P" and out[i + 1].split("=", 1)[0] == key:
                out[i + 1] = f"{key}={value}"
                break
        else:
            out += ["-P", f"{key}={value}"]
    return out


def test_readme_lists_the_entry_points_as_a_new_user_types_them():
    lines = readme_lines()
    assert {"train_teacher", "distill", "tune", "finetune", "evaluate", "experiment"} <= set(lines)
    for argv in (a for group in lines.values() for a in group):
        assert "--experiment-name" not in argv and argv[-2:] == ["--env-manager", "local"], argv


@pytest.mark.slow
def test_readme_mlflow_run_lines_end_finished_as_top_level_named_runs_and_report_finds_them(tmp_path):
    ucf = generate(tmp_path / "ucf101", "ucf101", SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=12,
                                                              size=(48, 64), seed=5)).root
    hmdb = generate(tmp_path / "hmdb51", "hmdb51", SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=12,
                                                              size=(48, 64), seed=6)).root
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bin_dir = str(Path(sys.executable).parent)  # `kdhar` and `mlflow` live beside this Python
    # MLflow's "=== Run (ID ...) succeeded ===" is an INFO line: a kdhar command run in this process
    # by an earlier test sets MLFLOW_LOGGING_LEVEL=WARNING in the environment, which would hide it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "MLFLOW_LOGGING_LEVEL": "INFO"}
    lines = readme_lines()
    tiny_train = {**TINY, "root": str(ucf)}
    plan = [
        (lines["train_teacher"][0], tiny_train),
        (lines["distill"][0], {**tiny_train, "student": "tiny3d"}),
        (lines["distill"][1], tiny_train),
        # mlflow run works in the project folder: the study goes to this test's own database.
        (lines["tune"][0], {**tiny_train, "n_trials": "1", "space": "lr=0.002:0.01:log",
                            "storage": f"sqlite:///{tmp_path / 'optuna.db'}"}),
        (lines["finetune"][0], {"root": str(hmdb), "epochs": "1"}),
        (lines["evaluate"][0], {"root": str(ucf)}),
        # PCL: the tiny set's 12 frames hold a tuple of three 4-frame clips only back to back.
        (lines["pretrain"][0], {**tiny_train, "pcl_interval": "0"}),
        (lines["distill"][2], {**tiny_train, "pcl_interval": "0"}),
    ]
    client = MlflowClient(uri)
    for argv, params in plan:
        command = with_params(argv, params)
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{shlex.join(command)}\n{done.stderr[-3000:]}"
        assert f"this run is in MLflow experiment '{EXPERIMENT}'" in done.stderr  # the one line saying where
        project_id = re.findall(r"=== Run \(ID '([0-9a-f]+)'\) succeeded ===", done.stderr)[-1]
        project = client.get_run(project_id)
        assert client.get_experiment(project.info.experiment_id).name == EXPERIMENT
        assert project.info.status == "FINISHED"
        # The project run is kdhar's run: named and tagged by kdhar, at the top level.
        assert project.data.tags.get("role") in ("teacher", "student", "tuning", "finetune", "evaluation", "pretrain")
        assert "mlflow.parentRunId" not in project.data.tags and "mlflow.note.content" in project.data.tags
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs)
    roles = ("teacher", "finetune", "evaluation", "pretrain")
    own = {r.data.tags["role"]: r for r in runs if r.data.tags.get("role") in roles}
    assert set(own) == set(roles)
    trials = [r for r in runs if "optuna_study" in r.data.tags and r.data.tags.get("role") == "student"]
    (study,) = [r for r in runs if r.data.tags.get("role") == "tuning"]
    assert trials and all(t.data.tags["mlflow.parentRunId"] == study.info.run_id for t in trials)
    assert study.info.run_name.startswith("tune-kd-tiny3d-c3d-")  # the default study name says the method
    students = [r for r in runs if r.data.tags.get("role") == "student" and "optuna_study" not in r.data.tags]
    assert sorted(r.info.run_name for r in students) == ["kd-c3d→tiny3d-f1-s0", "pcl-kd-c3d→r3d_18-f1-s0",
                                                         "scratch-tiny3d-f1-s0"]
    top_level = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top_level) == len(plan)  # one row per command: no unnamed umbrella runs
    assert all(r.data.tags.get("role") != "mlflow-project" for r in runs)

    report = subprocess.run(["kdhar", "report", "--out", str(tmp_path / "reports")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Student tiny3d on ucf101" in report.stdout and (tmp_path / "reports" / EXPERIMENT / "report.md").exists()
    (logged,) = client.search_runs([client.get_experiment_by_name(f"{EXPERIMENT}-reports").experiment_id])
    assert logged.data.tags["role"] == "report" and logged.info.status == "FINISHED"
    assert len(client.search_runs([exp.experiment_id])) == len(runs)  # the report added no run among the training runs
