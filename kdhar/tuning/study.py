"""A study in its storage: its name and pruner, creating or joining it (one worker creates, the
others check they run the same trials), the shared trial budget, dead workers' trials, and results."""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from kdhar import tracking
from kdhar.tuning.runs import TAG_STATE, TAG_STUDY, create_parent, tag_run, trial_run_ids
from kdhar.tuning.space import OBJECTIVE, TUNABLE, SearchSpace, study_config
from kdhar.tuning.storage import dashboard_command, make_storage, mask_url, storage_url


PRUNERS = ("median", "asha", "hyperband", "none")
# How long a worker joining a study waits for the creating worker to finish setting it up.
SETUP_WAIT_S = 30.0
# Study user attributes written by the worker that creates the study.
ATTR_SPACE = "search_space"
ATTR_OBJECTIVE = "objective"
ATTR_EXPERIMENT = "mlflow_experiment"
ATTR_PARENT = "mlflow_parent_run_id"
ATTR_CONFIG = "kdhar_config"  # what every trial shares (JSON), checked when a worker joins


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """median | asha | hyperband | none, sized for runs of `max_epochs` epochs."""
    if name == "asha":
        # Successive halving with rungs at 1, 3, 9, ... epochs: a trial goes on past a rung only
        # while it is in the best third of the trials that reached it. Unlike Hyperband it keeps
        # one bracket, so every trial after the first can be stopped early even in a study of a
        # few trials (Hyperband's least aggressive bracket never prunes).
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "median":
        # Accuracy after a single epoch is mostly noise: compare trials from the second epoch on,
        # and only once a few complete trials give a median worth trusting.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner '{name}' is unknown; use one of {', '.join(PRUNERS)}")


STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_study_name(name: str) -> str:
    """Returns `name` if it is safe where kdhar uses it (MLflow search filters, run names, file
    names); a quote in it used to break every later lookup of the study's runs.

    Raises:
        ValueError: other characters than letters, digits, '.', '_' and '-'.
    """
    if not STUDY_NAME.fullmatch(name):
        raise ValueError(f"study name {name!r}: use letters, digits, '.', '_' and '-' only (at most 128, "
                         "starting with a letter or digit)")
    return name


def slug(text: str) -> str:
    """The last path part of a teacher spec, safe in a study name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.rsplit("/", 1)[-1])[:60]


def open_study(
    storage: RDBStorage, name: str, space: SearchSpace, experiment: str, pruner: optuna.pruners.BasePruner,
    params: dict[str, Any], shared: dict[str, Any] | None = None,
) -> tuple[optuna.Study, str]:
    """Creates or joins the study and returns it with its MLflow parent run id.

    Creating the study is atomic in the database, so exactly one worker wins it; that worker records
    the search space, the configuration every trial shares (`shared`) and creates the parent run.
    Others check both and wait for the parent id to appear.
    """
    expected = {ATTR_SPACE: str(space), ATTR_OBJECTIVE: OBJECTIVE, ATTR_EXPERIMENT: experiment}
    if shared is not None:
        expected[ATTR_CONFIG] = json.dumps(shared, sort_keys=True, default=str)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner)
    except DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        _check_compatible(study, expected)
        return study, _join_parent(study, experiment, params)
    for key, value in expected.items():
        study.set_user_attr(key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.set_metric_names([OBJECTIVE])  # optuna-dashboard shows this name, not "Objective 0"
    parent_id = create_parent(experiment, name, params)
    study.set_user_attr(ATTR_PARENT, parent_id)
    return study, parent_id


def _check_compatible(study: optuna.Study, expected: dict[str, str]) -> None:
    name = study.study_name
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(
            f"study '{name}' already exists and minimises its objective; kdhar maximises validation "
            "accuracy: pick another study name"
        )
    deadline = time.monotonic() + SETUP_WAIT_S
    attrs = study.user_attrs
    # The creating worker may still be writing its attributes.
    while ATTR_SPACE not in attrs and not study.trials and time.monotonic() < deadline:
        time.sleep(0.5)
        attrs = study.user_attrs
    if ATTR_SPACE not in attrs:
        if study.trials:
            raise ValueError(f"study '{name}' exists but was not created by kdhar tune; pick another study name")
        for key, value in expected.items():  # its creator died before setting it up: adopt it
            study.set_user_attr(key, value)
        return
    if ATTR_CONFIG in expected:
        if ATTR_CONFIG not in attrs:  # made before kdhar recorded it: record it now
            study.set_user_attr(ATTR_CONFIG, expected[ATTR_CONFIG])
        else:
            was, now = json.loads(attrs[ATTR_CONFIG]), json.loads(expected[ATTR_CONFIG])
            diff = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
            if diff:
                raise ValueError(f"study '{name}' was created for other trials ({', '.join(diff[:4])}"
                                 f"{', ...' if len(diff) > 4 else ''}); rerun with the same settings or pick another "
                                 "study name")
    for key, value in expected.items():
        if key != ATTR_CONFIG and attrs.get(key) != value:
            raise ValueError(
                f"study '{name}' was created with {key} '{attrs.get(key)}', not '{value}'; "
                f"rerun with the same settings or pick another study name"
            )


def _join_parent(study: optuna.Study, experiment: str, params: dict[str, Any]) -> str:
    deadline = time.monotonic() + SETUP_WAIT_S
    while ATTR_PARENT not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    parent_id = study.user_attrs.get(ATTR_PARENT)
    if parent_id is None:
        # The creating worker died before making the parent run: take one tagged for this study.
        found = tracking.find_runs(experiment, f"tags.{TAG_STUDY} = '{study.study_name}' and tags.role = 'tuning'")
        parent_id = found[0]["run_id"] if found else create_parent(experiment, study.study_name, params)
        study.set_user_attr(ATTR_PARENT, parent_id)
    return parent_id


def budget_left(study: optuna.Study, n_trials: int, poll_s: float, gate: TrialGate) -> bool:
    """Whether this worker should start another trial; when it should, `gate` is left held until
    the trial exists (the objective releases it).

    A queued retry always runs; a new trial runs while fewer than `n_trials` are finished or
    running (trials of dead workers are replaced by their retries; collapsed trials count as
    finished). When only other workers' running trials fill the budget, wait: they either finish it
    or die, and a dead one's retry must still run. So a worker returns only when the study is done,
    and its summary is final.
    """
    while True:
        gate.acquire()
        _fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        # A collapsed trial failed on its own settings (no retry comes): it spends budget too.
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "fail_reason" in t.user_attrs for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if any(t.state == TrialState.WAITING for t in trials) or done + running < n_trials:
            return True
        gate.release()
        if done >= n_trials:
            return False
        time.sleep(poll_s)


class TrialGate:
    """Makes a worker's budget check and the creation of its next trial one step on PostgreSQL.

    Two workers that checked at the same moment would each see room for one more trial and the
    study would end with more than `n_trials`. The gate is a PostgreSQL advisory lock keyed by the
    study, held from the check until the new trial is in the storage. A SQLite study is for one
    worker (`tune`'s storage argument), so there the gate does nothing.
    """

    def __init__(self, storage: RDBStorage, study_name: str) -> None:
        engine = storage.engine
        self._conn = (engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                      if engine.dialect.name == "postgresql" else None)
        digest = hashlib.sha256(f"kdhar-tune:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self._held = False

    def acquire(self) -> None:
        if self._conn is not None and not self._held:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
            self._held = True

    def release(self) -> None:
        if self._conn is not None and self._held:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            self._held = False

    def close(self) -> None:
        """Releases the lock if held; closing the session would release it anyway."""
        if self._conn is not None:
            self.release()
            self._conn.close()


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retried_number(study: optuna.Study, number: int) -> int | None:
    """The number of the trial that running trial `number` retries, or None for a first attempt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number == number:
                return RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
    return None


def reconcile(
    storage: str | None, study_name: str, *, heartbeat_interval: int = 60, grace_period: int | None = None
) -> list[str]:
    """Fails trials whose worker died and ends their MLflow runs, which would stay RUNNING forever.

    Trials with no heartbeat for the grace period become FAIL (and get a retry queued); every FAIL
    trial whose MLflow run is still RUNNING has that run ended as KILLED. Each worker calls this on
    start; it is safe to run at any time.

    Returns:
        The MLflow run ids that were ended.
    """
    check_study_name(study_name)
    st = make_storage(storage, heartbeat_interval, grace_period)
    try:
        study = optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        raise ValueError(f"no study '{study_name}' in {mask_url(storage_url(storage))}") from None
    return reconcile_study(study)


def reconcile_study(study: optuna.Study) -> list[str]:
    """`reconcile` for an open study."""
    _fail_stale(study)
    experiment = study.user_attrs.get(ATTR_EXPERIMENT)
    if experiment is None:
        return []
    ended = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        # A killed worker never wrote the user attribute; its run is found by tags.
        candidates = trial_run_ids(experiment, study.study_name, t.number)
        for run_id in dict.fromkeys(candidates):
            if tracking.run_status(run_id) == "RUNNING":
                tag_run(experiment, run_id, {TAG_STATE: "FAIL"}, status="KILLED")
                ended.append(run_id)
    return ended


def study_trials(storage: str | None, study_name: str) -> list[dict[str, Any]]:
    """The trials of a study as plain dicts (number, state, params, value, user_attrs, retry_of)."""
    st = make_storage(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        raise ValueError(f"no study '{study_name}' in {mask_url(storage_url(storage))}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return [
            {"number": t.number, "state": t.state.name, "params": dict(t.params), "value": t.value,
             "user_attrs": dict(t.user_attrs), "retry_of": RetryHeartbeatStaleTrialCallback.retried_trial_number(t)}
            for t in study.get_trials(deepcopy=False)
        ]


def summarize(study: optuna.Study, storage: str | None = None) -> dict[str, Any]:
    """Counts, best trial and epochs consumed of a study."""
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return {
        "study_name": study.study_name,
        "storage": mask_url(storage_url(storage)),
        "trials": len(trials),
        "complete": count[TrialState.COMPLETE],
        "pruned": count[TrialState.PRUNED],
        "failed": count[TrialState.FAIL],
        "running": count[TrialState.RUNNING] + count[TrialState.WAITING],
        "epochs": sum(int(t.user_attrs.get("epochs", 0)) for t in trials),
        "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else None,
        "best_trial": best.number if best else None,
        "parent_run_id": study.user_attrs.get(ATTR_PARENT),
        "dashboard": dashboard_command(storage),
    }


def best_settings(study_name: str, storage: str | None = None) -> dict[str, float]:
    """The best complete trial's values (tau, alpha or lam, lr) of a study, for a grid to reuse.

    Raises:
        ValueError: no such study, or it has no complete trial yet.
    """
    check_study_name(study_name)
    st = make_storage(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        raise ValueError(f"no study '{study_name}' in {mask_url(storage_url(storage))}; run `kdhar tune` first") from None
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise ValueError(f"study '{study_name}' has no complete trial yet; run more trials with `kdhar tune`")
    return dict(max(complete, key=lambda t: t.value).params)


# Keys of a study's record that a grid cell may differ in without the study having measured something
# else: the cell's own seed (a study's trials use theirs), where the videos are (their fingerprint is
# compared), how many seeds a trial averaged, and the teacher's spec (a grid distils from its own
# teacher runs; whether the study tuned scratch or distilled runs is checked on its own).
NOT_COMPARED = {"optim.seed", "data.root", "val_seeds", "teacher"}


@dataclass(frozen=True)
class StudyRecord:
    """What a finished study measured (its record, `study_config`), what it searched and its best values."""

    name: str
    config: dict[str, Any]
    searched: list[str]
    best: dict[str, float]

    @property
    def scratch(self) -> bool:
        """Whether the study tuned runs without a teacher (`kdhar tune --teacher none`)."""
        return str(self.config.get("teacher", "")).lower() == "none"

    def differences(self, cfg, scratch: bool, fingerprint: str) -> list[str]:
        """How a run of `cfg` (a scratch run if `scratch`) differs from the runs the study measured,
        as "key study-value (cell: value)"; empty when the study's best settings are this run's to take."""
        if scratch != self.scratch:  # a scratch study for distilled cells, or the other way round
            return [f"teacher {self.config.get('teacher')!r} (cell: {'none' if scratch else 'a teacher'})"]
        teacher = "none" if scratch else str(self.config.get("teacher"))
        # Through JSON as the record went, so a tuple and the list it became compare equal.
        now = json.loads(json.dumps(study_config(cfg, self.searched, teacher, fingerprint), default=str))
        keys = sorted((set(self.config) | set(now)) - NOT_COMPARED)
        return [f"{k} {self.config.get(k)!r} (cell: {now.get(k)!r})" for k in keys if self.config.get(k) != now.get(k)]


def load_record(study_name: str, storage: str | None = None) -> StudyRecord:
    """A study's record and best complete trial, for a grid's `tuned:`.

    Raises:
        ValueError: no such study, no record of what it measured (made by an older kdhar, or not by
            `kdhar tune`), or no complete trial yet.
    """
    check_study_name(study_name)
    try:
        study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    except KeyError:
        raise ValueError(f"no study '{study_name}' in {mask_url(storage_url(storage))}; run `kdhar tune` first") from None
    attrs = study.user_attrs
    if ATTR_CONFIG not in attrs or ATTR_SPACE not in attrs:
        raise ValueError(f"study '{study_name}' does not record what its trials measured (not made by this kdhar's "
                         "`kdhar tune`); tune a new study")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise ValueError(f"study '{study_name}' has no complete trial yet; run more trials with `kdhar tune`")
    searched = [part.split("=", 1)[0] for part in attrs[ATTR_SPACE].split(",") if part]
    return StudyRecord(study_name, json.loads(attrs[ATTR_CONFIG]), [n for n in searched if n in TUNABLE],
                       dict(max(complete, key=lambda t: t.value).params))
