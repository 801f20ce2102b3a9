"""Commands over finished runs: `runs reconcile` (ends runs a dead process left RUNNING) and
`report` (tables, tests and plots from an experiment's runs)."""

from __future__ import annotations

from pathlib import Path

import click

from kdhar.cli.errors import UserError
from kdhar.cli.options import text_or_none


@click.group()
def runs() -> None:
    """Housekeeping of MLflow runs."""


@runs.command("reconcile")
@click.option("--storage", default=None, help="optuna storage URL without a password (default: $KDHAR_OPTUNA_STORAGE, "
              "else sqlite:///optuna.db)")
@click.option("--storage-file", default=None, help="a file whose first line is the optuna storage URL (may hold a password)")
@click.option("--study-name", default=None, help="a tuning study: its trials whose worker died")
@click.option("--experiment", default=None, help="an MLflow experiment: its runs whose process on this machine is gone")
def runs_reconcile(storage, storage_file, study_name, experiment) -> None:
    """End runs left RUNNING by a process that died (a tuning trial's worker, a killed grid cell) as KILLED."""
    if not text_or_none(study_name) and not text_or_none(experiment):
        raise UserError("give --study-name (a tuning study) or --experiment (runs of grids and commands), or both")
    ended = []
    if text_or_none(study_name):
        from kdhar import tuning

        ended += tuning.reconcile(tuning.storage_from_options(text_or_none(storage), text_or_none(storage_file)), study_name)
    if text_or_none(experiment):
        from kdhar import tracking
        from kdhar.experiments import reconcile_runs

        tracking.check_server(tracking.tracking_uri())
        if not tracking.experiment_exists(experiment):
            raise UserError(f"experiment '{experiment}' does not exist at {tracking.mask_uri(tracking.tracking_uri())}; "
                            "check --experiment (`mlflow experiments search` lists them)")
        ended += reconcile_runs(experiment)
    click.echo(f"ended {len(ended)} run(s) as KILLED" + (": " + ", ".join(ended) if ended else ""))


@click.command("report")
@click.option("--experiment", default=None, help="default: every experiment that holds kdhar student runs")
@click.option("--out", default="reports", show_default=True, type=click.Path(path_type=Path))
@click.option("--margin", default=5.0, show_default=True, type=click.FloatRange(0, 100, min_open=True, max_open=True),
              help="equivalence margin in accuracy points: within ±margin counts as no effect (TOST)")
def report_cmd(experiment, out, margin) -> None:
    """KD-vs-scratch tables, paired tests and plots (paper layout) from an experiment's runs; each
    report is logged as a run of the experiment `<experiment>-reports`."""
    from kdhar import tracking
    from kdhar.report import build_report, report_folder, reported_experiments

    tracking.check_server(tracking.tracking_uri())
    names = [experiment] if text_or_none(experiment) else reported_experiments()
    tracking.release_project_run({"role": "report-launcher"}, name="report",
                                 description=f"Launched `kdhar report` for {', '.join(names)}; each report is a run "
                                             "of the experiment <experiment>-reports.")
    for name in names:
        report = build_report(name, out / report_folder(name), margin=margin / 100)
        click.echo(report.text)
        for path in report.files:
            click.echo(f"wrote {path}")


COMMANDS = (runs, report_cmd)
