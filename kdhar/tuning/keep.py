"""What a study keeps of its trials' checkpoints: the best complete trial's `best.pt`, nothing else.

A trial is never resumed (a retried trial starts a run of its own), so a finished trial's `last.pt`
(weights, optimiser, RNG) serves nothing, and every trial's weights are its logged model. The one
file worth keeping is the best trial's `best.pt`: the weights of the epoch that scored the study's
best value (the logged model is the trial's last epoch). Without this, a study of n trials kept 2n
checkpoints.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
from optuna.trial import TrialState

from kdhar.train import checkpoint_dir

ATTR_RUN_ID = "mlflow_run_id"  # the trial's (first) MLflow run, as a user attribute
ATTR_RUN_IDS = "mlflow_run_ids"  # all its runs, one per validation seed, when there are several
# Where a trial's distill run writes its checkpoints (run_training's default workdir).
TRIAL_WORKDIR = Path("runs")
_ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def prune_trial_checkpoints(study: optuna.Study, workdir: str | Path = TRIAL_WORKDIR) -> list[Path]:
    """Deletes the checkpoints of the study's ended trials found under `workdir` on this machine,
    but the best complete trial's `best.pt`, and returns what it deleted. Trials still running
    (this worker's or another's) are left alone, so several workers may call it at any time;
    run again after a new best, it removes the former best's file.
    """
    best = _best_number(study)
    deleted = []
    for trial in study.get_trials(deepcopy=False, states=_ENDED):
        # One run per validation seed (--val-seeds): every one of them, the first as ATTR_RUN_ID.
        run_ids = trial.user_attrs.get(ATTR_RUN_IDS) or [trial.user_attrs.get(ATTR_RUN_ID)]
        for folder in (checkpoint_dir(workdir, r) for r in run_ids if r):
            if not folder.is_dir():
                continue
            if trial.number == best:
                doomed = [p for p in folder.iterdir() if p.name != "best.pt"]
            else:
                doomed = [folder]
            for path in doomed:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            deleted.extend(doomed)
    return deleted


def _best_number(study: optuna.Study) -> int | None:
    try:
        return study.best_trial.number
    except ValueError:  # no complete trial yet
        return None
