"""The `kdhar` command line itself: boolean options as flags or values, and a start-up that does not
load the training stack."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from kdhar.cli import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "optuna")


def _params(argv: list[str]) -> dict:
    """What the real command receives for `kdhar <argv>`; raises on anything the CLI rejects."""
    cmd = cli.commands[argv[0]]
    return cmd.make_context(argv[0], argv[1:]).params


@pytest.mark.parametrize("argv", [["--version"], ["-h"], ["distill", "-h"], ["train-teacher", "-h"], ["tune", "-h"]])
def test_version_and_help_load_no_training_stack(argv):
    # In a fresh interpreter, since this test process has imported them already.
    code = ("import json, sys\nfrom kdhar.cli import main\nsys.argv = ['kdhar', *json.loads(sys.argv[1])]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout or "version" in out.stdout
    assert json.loads(out.stderr.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    ("argv", "key", "expected"),
    [
        (["train-teacher", "--attention"], "attention", True),
        (["train-teacher", "--attention", "--epochs", "3"], "attention", True),  # a bare flag before another option
        (["train-teacher", "--attention", "false"], "attention", False),
        (["train-teacher", "--attention", "true"], "attention", True),
        (["train-teacher", "--attention=false"], "attention", False),
        (["train-teacher"], "attention", False),
        (["evaluate", "--model", "runs:/x/model", "--retrieval"], "retrieval", True),
        (["evaluate", "--retrieval", "--model", "runs:/x/model"], "retrieval", True),
        (["evaluate", "--model", "runs:/x/model", "--retrieval", "true"], "retrieval", True),
        (["evaluate", "--model", "runs:/x/model", "--retrieval", "no"], "retrieval", False),
        (["evaluate", "--model", "runs:/x/model", "--probe"], "probe", True),
        (["evaluate", "--model", "runs:/x/model"], "probe", False),
        (["distill", "--cache-teacher", "--views", "2"], "cache_teacher", True),
        (["distill", "--sync-bn"], "sync_bn", True),
        (["distill", "--sync-bn", ""], "sync_bn", None),  # MLproject's empty parameter: the preset decides
        (["tune", "--augment", "0"], "augment", False),
        (["finetune", "--model", "runs:/x/model", "--allow-config-change"], "allow_config_change", True),
        (["pretrain", "--stage-models", "false"], "stage_models", False),
        (["distill", "--stage-models", ""], "stage_models", None),  # PCL runs keep them, the others not
    ],
)
def test_boolean_options_take_a_bare_flag_or_a_value(argv, key, expected):
    params = _params(argv)
    assert params[key] is expected
    if "--epochs" in argv:
        assert params["epochs"] == 3


def test_a_boolean_option_refuses_a_word_that_is_no_boolean_in_one_line(kdhar_cli):
    out = kdhar_cli("evaluate", "--model", "runs:/x/model", "--retrieval", "maybe", cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'maybe' is not a valid boolean" in out.stderr


@pytest.mark.parametrize(("entry", "value", "expected"), [("train_teacher", "", None), ("train_teacher", "true", True),
                                                            ("evaluate", "", None), ("evaluate", "true", True)])
def test_mlproject_passes_boolean_values_the_cli_accepts(entry, value, expected, tmp_path):
    from mlflow.projects import _project_spec

    key = {"train_teacher": "attention", "evaluate": "retrieval"}[entry]
    entry_point = _project_spec.load_project(str(ROOT))._entry_points[entry]
    params = {key: value, **({"model": "runs:/x/model"} if entry == "evaluate" else {})}
    argv = shlex.split(entry_point.compute_command(params, str(tmp_path)))
    assert argv[:2] == ["kdhar", entry.replace("_", "-")]
    assert f"--{key}" in argv
    assert _params(argv[1:])[key] is expected


def _boolean_options(group: click.Group):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _boolean_options(cmd)
            continue
        for param in cmd.params:
            if isinstance(param, click.Option) and param.metavar == "[true|false]":
                yield name, param


def test_help_shows_each_boolean_option_once_with_its_values():
    options = list(_boolean_options(cli))
    assert {"attention", "retrieval", "cache_teacher", "allow_config_change", "sync_bn", "augment"} <= {p.name for _, p in options}
    shown: dict[str, str] = {}
    for name, param in options:
        if name not in shown:
            cmd = next(c for c in _all_commands(cli) if c.name == name)
            shown[name] = cmd.get_help(click.Context(cmd, info_name=name))
        lines = [line.split()[0] for line in shown[name].splitlines() if line.strip().startswith("--")]
        assert lines.count(param.opts[0]) == 1, (name, param.opts[0])
        assert f"{param.opts[0]} [true|false]" in shown[name]


def _all_commands(group: click.Group):
    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd)
        else:
            yield cmd
