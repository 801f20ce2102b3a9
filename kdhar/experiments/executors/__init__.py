"""Where the cells of a wave train. The grid (`kdhar.experiments.run`) decides which cells and in
which order; an executor only runs `run_cell` for each job it is handed.

- `local.LocalExecutor`: this process, or a pool of worker processes on this machine (the default).
- `ray.RayExecutor`: one Ray task per cell on a Ray cluster (`--executor ray`; imported on demand,
  Ray is an optional dependency).

A new executor is one module here with a class keeping `base.Executor`, and a choice in
`kdhar experiment run --executor`.
"""

from kdhar.experiments.executors.base import CellJob, Executor, run_cell
from kdhar.experiments.executors.local import LocalExecutor

__all__ = ["CellJob", "Executor", "LocalExecutor", "run_cell"]
