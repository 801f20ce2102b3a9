"""Running a grid: `run_grid` trains the cells of a spec wave by wave, `grid_status` says which are done.

`run_grid` trains the cells in plan order and skips every cell whose configuration already has a
FINISHED run in the experiment (looked up by the `config_hash` tag), so an interrupted grid picks up
where it stopped. Each wave's open cells are claimed (`claims.Claims`); those this runner won go to
the executor, and those another runner holds are waited for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdhar.experiments.claims import CHECKPOINTS, Claims, finished_run, interrupted_run
from kdhar.experiments.executors import CellJob, Executor, LocalExecutor
from kdhar.experiments.grid import GridSpec, SpecError
from kdhar.experiments.plan import WAVES, Cell, cell_hash
from kdhar.experiments.spec import load_spec, tuned_plan


@dataclass
class CellOutcome:
    """What happened to one cell: status is "done" or "skipped"."""

    cell: Cell
    status: str
    run_id: str
    seconds: float


def run_grid(
    spec_path: str | Path,
    workers: int = 1,
    experiment: str | None = None,
    *,
    device: str | None = None,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> list[CellOutcome]:
    """Runs every cell of a spec that has no FINISHED run with the same configuration yet.

    Args:
        spec_path: the YAML spec.
        workers: processes training independent cells of one wave at once; each gets
            cores // workers torch threads. Only for the default executor.
        experiment: MLflow experiment name; defaults to the spec's.
        device: torch device for every run ("cpu", "cuda", ...); None picks one.
        log: receives one progress line per cell.
        executor: what trains the cells each wave claims (`LocalExecutor(workers)` unless given,
            e.g. `kdhar.experiments.executors.ray.RayExecutor`); which cells, in which order, is
            decided here.

    Returns:
        One outcome per cell, in plan order.

    Raises:
        SpecError: a bad spec or a dataset root that does not exist.
    """
    spec = load_spec(spec_path)
    if workers < 1:
        raise SpecError(f"workers {workers} must be >= 1")
    exp = experiment or spec.experiment
    for ds in [spec.dataset] + ([spec.transfer] if spec.finetune and spec.transfer else []):
        if not Path(ds.root).exists():
            raise SpecError(f"{spec_path}: dataset root {ds.root} ({ds.name}) does not exist; "
                            "generate it with `kdhar data synth` or fix 'root'")
    _check_cpu_crop(spec, spec_path)
    cells = tuned_plan(spec, str(spec_path))
    executor = executor or LocalExecutor(workers)
    executor.start()
    try:
        log(f"grid {spec_path}: {len(cells)} cells in experiment '{exp}' ({executor.describe()})")
        grid = _GridRun(spec, cells, str(spec_path), exp, executor, device, log)
        grid.claims.start()
        try:
            for wave in WAVES:
                grid.run_wave(wave)
        finally:
            grid.claims.stop()
            grid.claims.release_all()
    finally:
        executor.close()
    return [grid.outcomes[i] for i in range(len(grid.cells))]


def grid_status(spec_path: str | Path, experiment: str | None = None) -> list[tuple[Cell, str | None]]:
    """Every cell of a spec in run order with the FINISHED run that already covers it (or None).

    What `run_grid` would skip; a distilled cell whose teacher has not finished yet, or a cell whose
    source (a fine-tune's student, a student's pretraining) has not, counts as not done.
    """
    spec = load_spec(spec_path)
    exp = experiment or spec.experiment
    cells = tuned_plan(spec, str(spec_path))
    position = {id(c): i for i, c in enumerate(cells)}
    done: dict[int, str | None] = {}
    teacher_runs: dict[str, str] = {}
    for i, cell in enumerate(cells):
        source_run = done.get(position[id(cell.source)]) if cell.source is not None else None
        teacher_run = teacher_runs.get(cell.teacher) if cell.wave == "kd" else None
        if (cell.wave == "kd" and teacher_run is None) or (cell.source is not None and source_run is None):
            done[i] = None
            continue
        done[i] = finished_run(exp, cell.role, cell_hash(cell, source_run=source_run, teacher_run=teacher_run))
        if cell.role == "teacher" and done[i]:
            teacher_runs[cell.teacher_id] = done[i]
    return [(cell, done[i]) for i, cell in enumerate(cells)]


@dataclass(frozen=True)
class _OpenCell:
    """A cell of the wave with no FINISHED run yet, and the runs it builds on."""

    position: int
    cell: Cell
    key: str  # its config_hash
    source_run: str | None
    teacher_run: str | None


def _check_cpu_crop(spec: GridSpec, spec_path: str | Path) -> None:
    """At size cpu a crop without a resize sets the resize too, so it is checked against the videos'
    own frames (as `--crop` is on the command line) before any cell trains."""
    if spec.size != "cpu":
        return
    from kdhar.data import check_crop_in_frames

    sets = [(spec.dataset, spec.overrides)]
    if spec.finetune and spec.transfer:
        sets.append((spec.transfer, {**spec.overrides, **spec.transfer_overrides}))
    for ds, overrides in sets:
        if "crop" in overrides and "resize" not in overrides:
            try:
                check_crop_in_frames(overrides["crop"], ds.name, ds.root, ds.split, ds.split_dir or None)
            except ValueError as exc:
                raise SpecError(f"{spec_path}: {exc}") from None


class _GridRun:
    """One `run_grid` call: its cells, what they produced so far and the claims it holds."""

    def __init__(self, spec: GridSpec, cells: list[Cell], spec_path: str, experiment: str, executor: Executor,
                 device: str | None, log: Callable[[str], None]) -> None:
        self.spec, self.spec_path, self.experiment, self.executor, self.device, self.log = (
            spec, spec_path, experiment, executor, device, log)
        self.cells = cells
        self.position = {id(c): i for i, c in enumerate(self.cells)}
        self.outcomes: dict[int, CellOutcome] = {}
        self.finished_runs: dict[int, str] = {}  # plan position -> run id, so fine-tunes find their source
        # Distilled students learn from the exact teacher run this grid trained (or found finished),
        # never from whichever teacher is the registry's champion at the time.
        self.teacher_runs: dict[str, str] = {}  # teacher cell id -> run id
        self.claims = Claims(experiment)

    def report(self, i: int, outcome: CellOutcome) -> None:
        """Records a cell's outcome, prunes a trained cell's checkpoint and logs one line."""
        if outcome.status == "done" and not self.spec.keep_checkpoints:
            # Pruned to the best validation epoch's weights: the resume state (optimiser and all) is
            # of no use once the run finished, and its last weights are the logged model.
            (CHECKPOINTS / outcome.run_id / "last.pt").unlink(missing_ok=True)
        self.outcomes[i] = outcome
        self.finished_runs[i] = outcome.run_id
        if outcome.cell.role == "teacher":
            self.teacher_runs[outcome.cell.teacher_id] = outcome.run_id
        width = len(str(len(self.cells)))
        what = "skipped (already finished)" if outcome.status == "skipped" else f"done in {outcome.seconds:.1f} s"
        self.log(f"[{len(self.outcomes):>{width}}/{len(self.cells)}] {outcome.cell.label()}: {what}, run {outcome.run_id}")

    def run_wave(self, wave: str) -> None:
        """Trains the cells of one wave that no run has finished and no other runner has claimed, then
        waits for those another runner is training; a cell whose other runner stopped without
        finishing it is claimed and trained on the next pass."""
        while True:
            open_cells = self.open_cells(wave)
            won = self.claims.take({c.key: c.cell.label() for c in open_cells}) if open_cells else set()
            mine = [c for c in open_cells if c.key in won]
            if mine:
                self.train(mine)
            elsewhere = [c for c in open_cells if c.key not in won]
            if not elsewhere:
                return
            for c in elsewhere:
                self.log(f"{c.cell.label()}: another runner is training it; waiting")
                run_id = self.claims.wait(c.cell.role, c.key)
                if run_id is not None:
                    self.report(c.position, CellOutcome(c.cell, "skipped", run_id, 0.0))

    def open_cells(self, wave: str) -> list[_OpenCell]:
        """The wave's cells not reported yet; those a FINISHED run already covers are reported skipped."""
        open_cells = []
        for cell in (c for c in self.cells if c.wave == wave):
            i = self.position[id(cell)]
            if i in self.finished_runs:
                continue
            source_run = self.finished_runs.get(self.position[id(cell.source)]) if cell.source is not None else None
            teacher_run = self.teacher_runs.get(cell.teacher) if cell.wave == "kd" else None
            if cell.wave == "kd" and teacher_run is None:
                raise SpecError(f"{self.spec_path}: teacher {cell.teacher} is not among the spec's teachers")
            key = cell_hash(cell, source_run=source_run, teacher_run=teacher_run)
            existing = finished_run(self.experiment, cell.role, key)
            if existing:
                self.report(i, CellOutcome(cell, "skipped", existing, 0.0))
            else:
                open_cells.append(_OpenCell(i, cell, key, source_run, teacher_run))
        return open_cells

    def train(self, claimed: list[_OpenCell]) -> None:
        """Hands the claimed cells to the executor (each resumed from its interrupted run's checkpoint,
        if any); each cell's claim is released once it is reported."""
        jobs = []
        for c in claimed:
            teacher_uri = f"runs:/{c.teacher_run}" if c.teacher_run else None
            resume = interrupted_run(self.experiment, c.cell, c.key, self.log)
            tags = {"config_hash": c.key, **_cell_tags(c.cell, c.source_run)}
            jobs.append(CellJob(c.position, c.cell, self.experiment, self.device, tags, self.spec.cache_teacher,
                                teacher_uri, resume))

        def done(job: CellJob, run_id: str, seconds: float) -> None:
            self.report(job.position, CellOutcome(job.cell, "done", run_id, seconds))
            self.claims.release(job.key)

        self.executor.train(jobs, done)


def _cell_tags(cell: Cell, source_run: str | None) -> dict[str, str]:
    """A fine-tune's tags naming the student run it starts from; a distilled cell's teacher name in the
    spec (`grid_teacher`, e.g. c3d-res-s1), which says which recipe and seed taught it; a student of
    `kd_stage: after_ssl` its pretraining run (`source_run`) and that run's configuration without
    the seed (`init_key`: so its row holds every seed, paired with the scratch run of its own seed);
    none for others."""
    tags = {"grid_teacher": cell.teacher} if cell.wave == "kd" else {}
    if cell.role == "student" and cell.source is not None:
        from kdhar.distill import pair_key

        return {**tags, "source_run": source_run or "", "kd_stage": "after_ssl",
                "init_key": f"pretrain-{pair_key(cell.source.cfg)}"}
    if cell.role != "finetune":
        return tags
    src = cell.source
    return {
        "source_run": source_run or "",
        "source_teacher_arch": src.teacher,
        "source_fraction": str(src.fraction),
        "student_arch": cell.arch,
    }
