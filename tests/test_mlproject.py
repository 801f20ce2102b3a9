"""Every MLproject entry point renders a command line that the CLI accepts, defaults included."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from mlflow.projects import _project_spec

from kdhar.cli import cli

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"model": "models:/kdhar-teacher-c3d@champion"}


def _entry_points():
    project = _project_spec.load_project(str(ROOT))
    return [(name, ep) for name, ep in project._entry_points.items()]


@pytest.mark.parametrize(("name", "entry_point"), _entry_points(), ids=[n for n, _ in _entry_points()])
def test_entry_point_parses_with_defaults(name, entry_point, tmp_path):
    params = {k: v for k, v in REQUIRED.items() if k in entry_point.parameters}
    command = entry_point.compute_command(params, str(tmp_path))
    argv = shlex.split(command)
    assert argv[0] == "kdhar"
    group_ctx = cli.make_context("kdhar", argv[1:], resilient_parsing=True)
    cmd_name, cmd, rest = cli.resolve_command(group_ctx, argv[1:])
    while hasattr(cmd, "resolve_command"):  # nested groups: `experiment run`, `data synth`
        sub_ctx = cmd.make_context(cmd_name, rest, resilient_parsing=True)
        cmd_name, cmd, rest = cmd.resolve_command(sub_ctx, rest)
    ctx = cmd.make_context(cmd_name, rest)  # raises on an option or value the CLI rejects
    if "epochs" in ctx.params:
        assert ctx.params["epochs"] is None  # "" means: the size preset decides


# Options an entry point may leave out: flags that turn a command into another one.
NOT_PARAMETERS = {"dashboard", "dry_run"}


@pytest.mark.parametrize(("name", "entry_point"), _entry_points(), ids=[n for n, _ in _entry_points()])
def test_entry_point_exposes_every_option_of_its_command(name, entry_point, tmp_path):
    import click

    command = entry_point.compute_command({k: v for k, v in REQUIRED.items() if k in entry_point.parameters}, str(tmp_path))
    argv = shlex.split(command)[1:]
    cmd = cli
    while isinstance(cmd, click.Group):
        cmd, argv = cmd.commands[argv[0]], argv[1:]
    options = {p.name for p in cmd.params if isinstance(p, click.Option)} - NOT_PARAMETERS
    given = {p.name for p in cmd.params if isinstance(p, click.Option) and set(p.opts) & set(argv)}
    assert options - given == set(), f"entry point {name} lacks {sorted(options - given)}"


@pytest.mark.slow
def test_mlflow_run_in_another_experiment_than_asked_is_refused_with_the_flag_to_add(tmp_path):
    """An explicit -P experiment that differs from where `mlflow run` filed the run (Default without
    --experiment-name) is refused in one line naming the flag; a report run adds its own experiment."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bin_dir = str(Path(sys.executable).parent)  # where `kdhar` and `mlflow` are installed
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    mlflow_bin = str(Path(bin_dir) / "mlflow")
    wrong = subprocess.run([mlflow_bin, "run", str(ROOT), "-e", "train_teacher", "-P", "experiment=kd-ui",
                            "-P", f"root={tmp_path / 'none'}", "--env-manager", "local"],
                           env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert wrong.returncode != 0
    assert "add --experiment-name kd-ui to the mlflow run command" in wrong.stderr
    assert "Traceback" not in wrong.stderr.split("kd-ui to the mlflow run command")[0].splitlines()[-1]

    base = [mlflow_bin, "run", str(ROOT), "-e", "report", "-P", "experiment=kd-ui", "--env-manager", "local"]
    right = subprocess.run([*base, "--experiment-name", "kd-ui"], env=env, capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert right.returncode == 0, right.stderr[-2000:]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("kd-ui").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "report"
