"""`kdhar tune`: an Optuna study of the KD knobs, each trial a nested MLflow run."""

from __future__ import annotations

import click

from kdhar.config import DataConfig

from kdhar.cli.data import ensure_data
from kdhar.cli.options import (
    INT,
    bool_option,
    build_config,
    gkd_options,
    kd_options,
    kd_settings,
    pcl_options,
    run_options,
    text_or_none,
)


@click.command("tune")
@click.option("--teacher", default="c3d", show_default=True,
              help="as for distill; none tunes the lr of scratch runs (the twins of distilled ones)")
@click.option("--student", default="tiny3d", show_default=True)
@click.option("--n-trials", type=INT, default=20, show_default=True, help="total trials of the study, over all workers")
@click.option("--study-name", default=None, help="default: derived from teacher, student and dataset")
@click.option("--storage", default=None, help="optuna storage URL without a password (default: $KDHAR_OPTUNA_STORAGE, else "
              "sqlite:///optuna.db; postgresql://... for many workers: give one with a password through that variable "
              "or --storage-file)")
@click.option("--storage-file", default=None, help="a file whose first line is the optuna storage URL (may hold a password)")
@kd_options
@click.option("--space", default=None, help='search space, e.g. "tau=1:8:log,alpha=0.1:0.9,lr=none" (none: not searched)')
@click.option("--pruner", type=click.Choice(["median", "asha", "hyperband", "none"]), default="median", show_default=True)
@click.option("--val-seeds", type=INT, default=1, show_default=True,
              help="runs per trial (seeds --seed, +1, ...), each with its own validation groups; a trial scores their "
                   "mean best validation accuracy")
@bool_option("--cache-teacher", default=False, show_default=True,
             help="reuse teacher logits across trials for replayed views (needs --views)")
@click.option("--dashboard", is_flag=True, help="print the optuna-dashboard command for the storage and exit")
@click.option("--heartbeat-interval", type=INT, default=60, show_default=True,
              help="seconds between a trial's heartbeats; a trial silent for the grace period is failed and retried")
@click.option("--grace-period", type=INT, default=None, help="seconds without a heartbeat before a trial counts as dead "
              "(default twice the interval); a restarted single worker waits this long for its own dead trial")
@pcl_options
@gkd_options
@run_options(exclude=("resume", "allow_config_change", "stage_models"))
def tune_cmd(teacher, student, n_trials, study_name, storage, storage_file, tau, kd_weighting, alpha, lam, space, pruner,
             val_seeds, cache_teacher, dashboard, heartbeat_interval, grace_period, **opts) -> None:
    """Tune the KD temperature, weight and lr with Optuna (trials are nested MLflow runs); with --kd gkd
    GKD's beta and ramp (and tau/alpha for gkd+logit); with --teacher none the lr of scratch runs."""
    from kdhar import tuning

    storage = tuning.storage_from_options(text_or_none(storage), text_or_none(storage_file))
    if dashboard:
        click.echo(tuning.dashboard_command(storage))
        return
    kd = kd_settings(tau, kd_weighting, alpha, lam, opts["ssl"])
    if opts["ssl"] == "pcl" and opts.get("val_fraction") is None:
        # PCL runs hold nothing out by default; a study scores its trials on held-out groups, never the test split.
        opts = {**opts, "val_fraction": DataConfig.val_fraction}
    cfg = build_config(student, opts, kd=kd)
    ensure_data(cfg.data.root)
    scratch = teacher.lower() == "none"
    summary = tuning.tune(
        cfg, teacher=teacher, n_trials=n_trials, study_name=text_or_none(study_name), storage=storage,
        space=tuning.SearchSpace.parse(text_or_none(space), kd["weighting"], cfg.gkd.method, scratch), pruner=pruner,
        experiment=opts["experiment"], seed=opts["seed"], cache_teacher=bool(cache_teacher) and not scratch,
        device=opts["device"], log=lambda line: click.echo(line, err=True), heartbeat_interval=heartbeat_interval,
        grace_period=grace_period, val_seeds=val_seeds,
    )
    report_study(summary)


def report_study(summary: dict) -> None:
    """Prints the study's counts, best value and settings, and the dashboard command.

    Raises:
        click.ClickException: no trial completed and none is still running, so there are no settings
            to use (the exit status says so to a script or a scheduler; it was 0 with "best None").
    """
    counts = f"{summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed"
    if not summary["complete"] and not summary["running"]:
        click.echo(f"dashboard: {summary['dashboard']}")
        raise click.ClickException(
            f"study {summary['study_name']}: no trial completed ({counts}), so it has no best settings; each trial's "
            "fail_reason (its MLflow tag and Optuna user attribute) says why: change the search space or the teacher")
    best = summary.get("best_params") or {}
    click.echo(f"study {summary['study_name']}: {counts}; best val acc {summary['best_value']} at "
               + ", ".join(f"{k}={v:.3g}" for k, v in best.items()))
    click.echo(f"dashboard: {summary['dashboard']}")


COMMANDS = (tune_cmd,)
