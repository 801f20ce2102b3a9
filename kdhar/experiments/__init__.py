"""Experiment grids: a YAML spec of teachers x students x fractions x seeds, run and resumed cell by cell.

A spec is plain data (see experiments/*.yaml). The package reads it in one direction:

- `grid`: what a grid is made of (`GridSpec`, `DatasetSpec`, the keys a spec may use, `SpecError`).
- `plan`: the spec's cells in run order (teachers, scratch students, distilled students, fine-tunes),
  each with the `RunConfig` of `build_run_config`, and `cell_hash`, the `config_hash` of its run.
- `spec`: `load_spec` / `parse_spec`, every value checked and every cell planned before any trains;
  `tuned_plan`, the plan with the `tuned:` studies' best settings on the cells each measured.
- `claims`: FINISHED and interrupted runs of a cell, and the claims that let two runners share a grid.
- `executors`: where a wave's claimed cells train (`LocalExecutor`; `executors.ray.RayExecutor`).
- `run`: `run_grid`, wave by wave, skipping every cell whose configuration already has a FINISHED
  run, so an interrupted grid picks up where it stopped; `grid_status`, what it would skip.

The names below are the package's interface; import them from `kdhar.experiments`.
"""

from kdhar.experiments.claims import CHECKPOINTS, Claims, finished_run, interrupted_run, reconcile_runs
from kdhar.experiments.executors import CellJob, Executor, LocalExecutor, run_cell
from kdhar.experiments.grid import (
    DATASET_KEYS,
    MODEL_OVERRIDES,
    OVERRIDES,
    SIZES,
    SPEC_KEYS,
    TUNED_ARMS,
    DatasetSpec,
    GridSpec,
    SpecError,
    TeacherSpec,
)
from kdhar.experiments.plan import GKD_TEACHER, WAVES, Cell, build_run_config, cell_hash, check_override, plan
from kdhar.experiments.run import CellOutcome, grid_status, run_grid
from kdhar.experiments.spec import load_spec, parse_spec, tuned_plan

__all__ = [
    "CHECKPOINTS", "DATASET_KEYS", "GKD_TEACHER", "MODEL_OVERRIDES", "OVERRIDES", "SIZES", "SPEC_KEYS", "TUNED_ARMS",
    "WAVES", "Cell", "CellJob", "CellOutcome", "Claims", "DatasetSpec", "Executor", "GridSpec", "LocalExecutor",
    "SpecError", "TeacherSpec",
    "build_run_config", "cell_hash", "check_override", "finished_run", "grid_status", "interrupted_run",
    "load_spec", "parse_spec", "plan", "reconcile_runs", "run_cell", "run_grid", "tuned_plan",
]
