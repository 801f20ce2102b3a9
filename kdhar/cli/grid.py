"""Commands that run many cells from a YAML spec: `experiment run` (a grid) and `demo` (a grid, a
short tuning study and the report on the synthetic data)."""

from __future__ import annotations

from pathlib import Path

import click

from kdhar.cli.data import ensure_data
from kdhar.cli.errors import UserError
from kdhar.cli.options import INT, text_or_none


@click.group()
def experiment() -> None:
    """Experiment grids from YAML specs."""


@experiment.command("run")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--workers", type=INT, default=1, show_default=True, help="worker processes per phase")
@click.option("--experiment", "experiment_name", default=None, help="overrides the spec's experiment")
@click.option("--device", default="auto", show_default=True)
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine's processes (--workers); ray: each cell a Ray task (pip install kdhar[ray])")
@click.option("--address", default=None, help="with --executor ray: the Ray cluster (auto, host:6379); default: start Ray on this machine")
@click.option("--dry-run", is_flag=True, help="list the cells in run order and which are already done; train nothing")
def experiment_run(spec, workers, experiment_name, device, executor, address, dry_run) -> None:
    """Train every cell of a grid (teachers first), skipping cells already finished."""
    from kdhar.experiments import load_spec, run_grid

    address = text_or_none(address)
    if address and executor != "ray":
        raise UserError("--address is the Ray cluster of --executor ray; add --executor ray or leave out --address")
    if executor == "ray" and workers != 1:
        raise UserError("--workers is for --executor local; on Ray as many cells run at once as the cluster's "
                        "CPUs and GPUs allow")
    if not spec.exists():
        raise UserError(f"experiment spec {spec} does not exist (see experiments/*.yaml)")
    if dry_run:
        _seeds_note(spec, load_spec(spec).seeds)
        _print_status(spec, text_or_none(experiment_name))
        return
    grid_executor = _ray_executor(address) if executor == "ray" else None
    loaded = load_spec(spec)
    for root in _spec_roots(loaded):
        ensure_data(root)
    _seeds_note(spec, loaded.seeds)
    from kdhar import tracking

    tracking.release_project_run({"role": "grid", "spec": str(spec)}, name=f"grid-{spec.stem}",
                                 description=f"Launched the grid {spec}: each cell is a run of its own in the spec's experiment.")
    outcomes = run_grid(spec, workers=workers, experiment=text_or_none(experiment_name), device=device, log=click.echo,
                        executor=grid_executor)
    done = sum(o.status == "done" for o in outcomes)
    click.echo(f"{done} trained, {len(outcomes) - done} already finished")


def _seeds_note(spec: Path, seeds: list[int]) -> None:
    """Says so, on stderr, when a spec pairs several seeds but too few for the report to decide
    anything (one seed is a smoke run, not a comparison)."""
    from kdhar import stats

    note = stats.seeds_note(len(seeds)) if len(seeds) > 1 else None
    if note:
        click.echo(f"note: {spec}: {note}", err=True)


def _print_status(spec: Path, experiment: str | None) -> None:
    """--dry-run: each cell in run order, done (with its run) or to train."""
    from kdhar import tracking
    from kdhar.experiments import grid_status

    tracking.check_server(tracking.tracking_uri())
    status = grid_status(spec, experiment)
    for n, (cell, run_id) in enumerate(status, 1):
        click.echo(f"[{n:>{len(str(len(status)))}}/{len(status)}] {cell.label()}: "
                   + (f"done, run {run_id}" if run_id else "to train"))
    todo = sum(run_id is None for _, run_id in status)
    click.echo(f"{len(status) - todo} done, {todo} to train")


def _ray_executor(address: str | None):
    """--executor ray: cells as Ray tasks on the cluster at `address` (None: Ray started on this machine)."""
    try:
        from kdhar.experiments.executors.ray import RayExecutor
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install kdhar[ray]") from None
    return RayExecutor(address, log=click.echo)


@click.command("demo")
@click.option("--spec", default="experiments/demo.yaml", show_default=True, type=click.Path(path_type=Path))
@click.option("--n-trials", type=INT, default=4, show_default=True, help="trials of the short tuning study")
@click.option("--tune-epochs", type=INT, default=None, help="epochs per trial (default: the students' epochs)")
def demo(spec, n_trials, tune_epochs) -> None:
    """The whole product on the synthetic data: teacher, KD student + scratch twin, tuning, report.

    Everything already finished (same configuration) is reused, so a second run is quick.
    """
    from kdhar import tracking, tuning
    from kdhar.experiments import build_run_config, load_spec, run_grid
    from kdhar.report import build_report

    grid = load_spec(spec)
    tracking.check_server(tracking.tracking_uri())
    tracking.release_project_run({"role": "demo", "spec": str(spec)}, name="demo",
                                 description=f"Launched the demo ({spec}): its runs are in the experiment {grid.experiment}.")
    for root in _spec_roots(grid):
        ensure_data(root)
    click.echo(f"== 1/3 teacher, distilled student and its scratch twin ({spec})")
    outcomes = run_grid(spec, log=click.echo)
    teacher_run = next(o.run_id for o in outcomes if o.cell.role == "teacher")
    student = grid.students[0]
    overrides = {**grid.overrides, **({"epochs": tune_epochs} if tune_epochs else {})}
    cfg = build_run_config(
        student, size=grid.size, overrides=overrides, dataset=grid.dataset,
        fraction=grid.fractions[0], seed=grid.seeds[0], kd=grid.kd,
    )
    space = tuning.SearchSpace.default(grid.weighting)
    click.echo(f"== 2/3 tuning {', '.join(space.names())}: {n_trials} trials of up to {cfg.optim.epochs} epochs (median pruning)")
    summary = tuning.tune(
        cfg, teacher=f"runs:/{teacher_run}", n_trials=n_trials, study_name=f"{grid.experiment}-kd",
        space=space, pruner="median", experiment=grid.experiment, seed=0, cache_teacher=True, log=click.echo,
    )
    best = summary.get("best_params") or {}
    click.echo(f"best val acc {summary['best_value']} at " + ", ".join(f"{k}={v:.3g}" for k, v in best.items()))
    click.echo("== 3/3 report")
    report = build_report(grid.experiment, Path("reports") / grid.experiment)
    click.echo(report.text)
    click.echo(
        "\nSee every run, curve and model in the MLflow UI:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri()}\n  then open http://127.0.0.1:5000 and choose \"Model training\""
    )


def _spec_roots(spec) -> list[str]:
    roots = [spec.dataset.root] if getattr(spec, "dataset", None) else []
    transfer = getattr(spec, "transfer", None)
    if transfer is not None and getattr(spec, "finetune", False):
        roots.append(transfer.root)
    return roots


COMMANDS = (experiment, demo)
