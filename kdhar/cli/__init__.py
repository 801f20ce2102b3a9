"""The `kdhar` command: the click group, its entry point and the one-line form of user errors.

Each command maps MLproject parameters 1:1 to options and calls the library; the commands live in
the submodules by what they do (data, train, evaluate, tune, grid, runs, bench), each listing its
own in `COMMANDS`, and shared options in `options`. Importing this package loads click and kdhar's
config only: a command imports torch, MLflow or Optuna inside its body, so `kdhar -h` stays fast.
"""

from __future__ import annotations

import os
import sys

import click

from kdhar.cli import bench, data, detect, evaluate, grid, runs, train, tune
from kdhar.cli.data import ensure_data
from kdhar.cli.errors import UserError, is_user_error, operational_error
from kdhar.cli.options import (
    BOOL,
    DEFAULT_HMDB_ROOT,
    DEFAULT_ROOT,
    EVAL_OPTIONS,
    FLOAT,
    INT,
    KD_PRESETS,
    RUN_OPTIONS,
    bool_option,
    build_config,
    gkd_options,
    kd_options,
    kd_settings,
    launch_options,
    pcl_options,
    run_options,
)

__all__ = [
    "BOOL", "DEFAULT_HMDB_ROOT", "DEFAULT_ROOT", "EVAL_OPTIONS", "FLOAT", "INT", "KD_PRESETS", "RUN_OPTIONS",
    "UserError", "bool_option", "build_config", "cli", "ensure_data", "gkd_options", "kd_options", "kd_settings",
    "launch_options", "main", "pcl_options", "run_options",
]

# Third-party chatter that buries kdhar's own lines: MLflow's artifact-download bars and INFO logs,
# Optuna's line per trial. --verbose keeps them.
QUIET_LOGGERS = ("mlflow", "optuna", "alembic", "urllib3")
# Loggers that print a traceback for an error they raise anyway, which kdhar then reports in one line
# (MLflow's SQLite store logs "database or disk is full" with its whole chain). --verbose keeps them.
RAISED_ANYWAY_LOGGERS = ("mlflow.store.db.utils",)


def _quiet_third_parties() -> None:
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow resets its loggers when imported
    os.environ.setdefault("KDHAR_QUIET_OPTUNA", "1")  # so does Optuna: kdhar.tuning applies this
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in RAISED_ANYWAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdhar", prog_name="kdhar")
@click.option("--debug", is_flag=True, help="show tracebacks for user errors too")
@click.option("--verbose", is_flag=True, help="keep MLflow's and Optuna's own logs and progress bars")
def cli(debug: bool, verbose: bool) -> None:
    """Knowledge distillation for video action recognition.

    Shell completion (bash): eval "$(_KDHAR_COMPLETE=bash_source kdhar)"; zsh: zsh_source; fish: fish_source.
    """
    if debug:
        os.environ["KDHAR_DEBUG"] = "1"
    if not verbose:
        _quiet_third_parties()


for _module in (data, train, evaluate, detect, tune, grid, runs, bench):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    """Console entry point: user mistakes become one-line errors (--debug or KDHAR_DEBUG=1 shows tracebacks)."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("KDHAR_DEBUG"):
            raise
        message, code = operational_error(exc), 1  # a full disk, a killed worker
        if message is None and is_user_error(exc):
            message, code = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, 2
        if message is None:
            raise
        click.echo(f"Error: {message}", err=True)  # the same form as click's own usage errors
        sys.exit(code)
