"""Optuna search over the distillation settings (temperature, soft-term weight) and the learning rate.

Every trial is one ordinary `kdhar.distill.distill` run (same data, logging and checkpoints as the
`distill` command) with `cfg.kd` replaced by the trial's values, recorded as an MLflow run nested
under one parent run per study. The objective is the best per-epoch validation video accuracy
(held-out training groups), never the test split, so tuning cannot leak into the reported figures;
with several validation seeds, the mean over one run per seed. With teacher "none" a study tunes the
lr of scratch runs, so the scratch twin of a tuned distilled run can get the same budget. A study
records what its trials measured (`study_config`), which a grid's `tuned:` checks (`StudyRecord`).

Several workers may share one study through a server database (PostgreSQL): heartbeats mark a
killed worker's trial FAIL, a retry of it is queued for the survivors, and `reconcile` ends the
killed trial's MLflow run so it does not stay RUNNING.

The parts: `space` (what is searched), `storage` (where the study lives), `study` (creating or
joining it, the shared budget, dead workers, results), `runs` (the MLflow parent and trial runs),
`search` (`tune` and the trial objective). This package is the only one that imports optuna.
"""

import os

import optuna

if os.environ.get("KDHAR_QUIET_OPTUNA"):  # set by the CLI unless --verbose: kdhar prints its own line per trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)

from kdhar.tuning.runs import TAG_RETRY_OF, TAG_STATE, TAG_STUDY, TAG_TRIAL  # noqa: E402
from kdhar.tuning.search import TrialCollapsed, TrialObjective, tune  # noqa: E402
from kdhar.tuning.space import (  # noqa: E402
    GKD_KNOBS, LOGIT_KNOBS, OBJECTIVE, OPERATIONAL, SEARCHED_KEYS, TUNABLE, ParamRange, SearchSpace, study_config,
    trial_config,
)
from kdhar.tuning.storage import (  # noqa: E402
    DEFAULT_STORAGE, MAX_RETRY, STORAGE_ENV, StorageUnavailableError, dashboard_command, has_password, make_storage,
    mask_url, storage_from_options, storage_url,
)
from kdhar.tuning.study import (  # noqa: E402
    ATTR_CONFIG, ATTR_EXPERIMENT, ATTR_OBJECTIVE, ATTR_PARENT, ATTR_SPACE, NOT_COMPARED, PRUNERS, SETUP_WAIT_S,
    STUDY_NAME, StudyRecord, best_settings, check_study_name, load_record, make_pruner, reconcile, reconcile_study,
    study_trials, summarize,
)

__all__ = [
    "DEFAULT_STORAGE", "STORAGE_ENV", "storage_url", "storage_from_options", "SearchSpace", "ParamRange", "StorageUnavailableError", "tune", "reconcile",
    "reconcile_study", "summarize", "make_storage", "make_pruner", "mask_url", "dashboard_command", "best_settings",
    "StudyRecord", "load_record", "study_config", "trial_config",
]
