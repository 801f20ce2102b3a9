"""Optuna search over the distillation settings (temperature, soft-term weight) and the learning rate.

Every trial is one ordinary `kdhar.distill.distill` run (same data, logging and checkpoints as the
`distill` command) with `cfg.kd` replaced by the trial's values, recorded as an MLflow run nested
under one parent run per study. The objective is the best per-epoch validation video accuracy
(held-out training groups), never the test split, so tuning cannot leak into the reported figures.

Several workers may share one study through a server database (PostgreSQL): heartbeats mark a
killed worker's trial FAIL, a retry of it is queued for the survivors, and `reconcile` ends the
killed trial's MLflow run so it does not stay RUNNING.

This is the only module that imports optuna.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from kdhar import tracking
from kdhar.config import RunConfig
from kdhar.objectives.stuck import STUCK_ACC_FACTOR

if os.environ.get("KDHAR_QUIET_OPTUNA"):  # set by the CLI unless --verbose: kdhar prints its own line per trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
from kdhar.train import StopTraining

# SQLite rather than a journal file: Optuna's heartbeats only work with an RDB storage, so a
# single worker that was killed gets its stale trial failed and retried on the next run; it is
# also what optuna-dashboard and `mlflow.db` users already know. SQLite locks badly under
# concurrent writers: several workers need a server database (postgresql://...).
DEFAULT_STORAGE = "sqlite:///optuna.db"
# Where a storage URL with a password should come from: the environment, not a command line (where
# `ps` shows it) or an `mlflow run -P storage=...` parameter (which MLflow logs as a run param).
STORAGE_ENV = "KDHAR_OPTUNA_STORAGE"
OBJECTIVE = "val_video_top1"  # per-epoch metric logged by kdhar.train for the held-out groups
PRUNERS = ("median", "asha", "hyperband", "none")
# A killed worker's trial is failed once its heartbeat is older than the grace period; a trial is
# retried at most this many times, so a configuration that kills its worker every time stops.
MAX_RETRY = 2
# How long a worker joining a study waits for the creating worker to finish setting it up.
SETUP_WAIT_S = 30.0

# Tags that link an MLflow run to its study and trial.
TAG_STUDY = "optuna_study"
TAG_TRIAL = "optuna_trial_number"
TAG_STATE = "optuna_state"
TAG_RETRY_OF = "optuna_retry_of"

# Study user attributes written by the worker that creates the study.
ATTR_SPACE = "search_space"
ATTR_OBJECTIVE = "objective"
ATTR_EXPERIMENT = "mlflow_experiment"
ATTR_PARENT = "mlflow_parent_run_id"
ATTR_CONFIG = "kdhar_config"  # what every trial shares (JSON), checked when a worker joins
# Knobs that say how a trial runs, not what it measures: workers may differ in them.
OPERATIONAL = {"data.num_workers", "data.on_missing", "data.on_bad", "optim.threads"}


class StorageUnavailableError(ConnectionError, ValueError):
    """The Optuna storage URL is malformed or its database cannot be reached."""


# ---------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class ParamRange:
    low: float
    high: float
    log: bool = False

    def __str__(self) -> str:
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "")


TUNABLE = ("tau", "alpha", "lam", "lr", "beta", "ramp", "rec_weight", "gd_weight")
# The logit-KD knobs and GKD's, by the `--kd` methods they act in.
LOGIT_KNOBS, GKD_KNOBS = ("tau", "alpha", "lam"), ("beta", "ramp", "rec_weight", "gd_weight")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the KD settings and the learning rate; a field left None is not searched.

    The student loss is (1 - alpha) * CE + alpha * tau^2 * KL under the default "mix" weighting, or
    CE + lam * tau^2 * KL under "sum" (the paper's). The tau^2 factor equalises the soft term's
    gradient across temperatures only at high tau; at tau 1-4 it is of the order of CE's or larger,
    so the soft weight and the learning rate interact: under "sum" at the CE-tuned lr a width-4
    student collapsed (README). Hence lr is searched too, on a log scale around the CPU preset's.
    - tau in [1, 8], log scale: 1 is the teacher's raw softmax; with 10-101 classes the softened
      targets are nearly uniform well before 20, and tau 2-4 is where the measurements sit.
    - alpha in [0.1, 0.9]: below 0.1 the run is its scratch twin in disguise, above 0.9 the labels
      hardly count.
    - lam in [0.1, 2] (weighting "sum"): the paper's 1 sits inside.
    - lr in [0.005, 0.05], log scale: a factor 2.5 either side of the CPU preset's 0.02.
    - GKD (`--kd gkd`, `gkd+logit`): beta, the attention-distillation weight, in [0.01, 1], log scale
      around the paper's 0.1; ramp, the share of the epochs over which the regeneration weight
      ramps up, in [0.05, 1] (the paper's 0.1 inside). rec_weight (regeneration, the paper's 0.5)
      and gd_weight (generative distillation, 0.01) are searched only when asked for, e.g.
      `rec_weight=0.05:1:log,gd_weight=0.001:0.1:log`.
    """

    tau: ParamRange | None = ParamRange(1.0, 8.0, log=True)
    alpha: ParamRange | None = ParamRange(0.1, 0.9)
    lam: ParamRange | None = None
    lr: ParamRange | None = ParamRange(0.005, 0.05, log=True)
    beta: ParamRange | None = None
    ramp: ParamRange | None = None
    rec_weight: ParamRange | None = None
    gd_weight: ParamRange | None = None

    def __str__(self) -> str:
        return ",".join(f"{name}={getattr(self, name)}" for name in TUNABLE if getattr(self, name) is not None)

    def names(self) -> list[str]:
        return [name for name in TUNABLE if getattr(self, name) is not None]

    @classmethod
    def default(cls, weighting: str = "mix", method: str = "logit") -> SearchSpace:
        """The default ranges for a KD weighting (alpha under "mix", lam under "sum") and `--kd`
        method: GKD's beta and ramp for gkd and gkd+logit, no logit-KD knob for gkd alone."""
        space = cls(alpha=None, lam=ParamRange(0.1, 2.0)) if weighting == "sum" else cls()
        if method != "logit":
            space = dataclasses.replace(space, beta=ParamRange(0.01, 1.0, log=True), ramp=ParamRange(0.05, 1.0))
        if method == "gkd":
            space = dataclasses.replace(space, tau=None, alpha=None, lam=None)
        return space

    @classmethod
    def parse(cls, text: str | None, weighting: str = "mix", method: str = "logit") -> SearchSpace:
        """Parses "tau=1:8:log,alpha=0.2:0.8,lr=none"; parameters left out keep their defaults for
        the weighting and method, and `none` leaves a parameter out of the search (fixed at the run's value).

        Raises:
            ValueError: naming the part that is an unknown parameter, bad syntax, an empty range, or
                a weight that does not act under `weighting`.
        """
        space = cls.default(weighting, method)
        if text is None or not text.strip():
            return space
        seen: set[str] = set()
        for part in text.split(","):
            name, sep, rng = part.strip().partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"search space part '{part}' is not name=low:high[:log] (e.g. tau=1:8:log)")
            if name not in TUNABLE:
                raise ValueError(f"search space part '{part}': unknown parameter '{name}'; tunable: {', '.join(TUNABLE)}")
            if name in seen:
                raise ValueError(f"search space part '{part}': {name} is given twice")
            unused = {"mix": "lam", "sum": "alpha"}.get(weighting)
            if name == unused:
                raise ValueError(f"search space part '{part}': {name} does not act under --kd-weighting {weighting}")
            if (name in GKD_KNOBS and method == "logit") or (name in LOGIT_KNOBS and method == "gkd"):
                raise ValueError(f"search space part '{part}': {name} does not act under --kd {method}")
            seen.add(name)
            value = None if rng.strip() == "none" else _parse_range(name, rng.strip(), part)
            space = dataclasses.replace(space, **{name: value})
        return space


def _parse_range(name: str, text: str, part: str) -> ParamRange:
    fields = text.split(":")
    if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] not in ("log", "linear")):
        raise ValueError(f"search space part '{part}' is not {name}=low:high[:log|linear] (e.g. {name}=1:20:log)")
    try:
        low, high = float(fields[0]), float(fields[1])
    except ValueError:
        raise ValueError(f"search space part '{part}': bounds must be numbers") from None
    log = len(fields) == 3 and fields[2] == "log"
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"search space part '{part}' is an empty range: low must be below high")
    if name in ("tau", "lr") and low <= 0:
        raise ValueError(f"search space part '{part}': {name} must stay above 0")
    if name in ("lam", "alpha", "beta", "rec_weight", "gd_weight") and low < 0:
        raise ValueError(f"search space part '{part}': the KD weight cannot be negative")
    if name == "ramp" and (low <= 0 or high > 1):
        raise ValueError(f"search space part '{part}': ramp is a share of the epochs in (0, 1]")
    if name == "alpha" and high > 1:
        raise ValueError(f"search space part '{part}': alpha is a share in [0, 1]")
    if log and low <= 0:
        raise ValueError(f"search space part '{part}': a log range needs low > 0")
    return ParamRange(low, high, log)


def _suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, float]:
    return {
        name: trial.suggest_float(name, rng.low, rng.high, log=rng.log)
        for name in space.names()
        for rng in [getattr(space, name)]
    }


def trial_config(cfg: RunConfig, values: dict[str, float]) -> RunConfig:
    """`cfg` with a trial's (or a study's best) values applied: KD knobs to cfg.kd, GKD's to cfg.gkd,
    lr to cfg.optim."""
    kd = dataclasses.replace(cfg.kd, **{k: v for k, v in values.items() if k in LOGIT_KNOBS})
    gkd = dataclasses.replace(cfg.gkd, **{k: v for k, v in values.items() if k in GKD_KNOBS})
    optim = dataclasses.replace(cfg.optim, lr=values["lr"]) if "lr" in values else cfg.optim
    return dataclasses.replace(cfg, kd=kd, gkd=gkd, optim=optim)


# ---------------------------------------------------------------------------- storage
def mask_url(url: str) -> str:
    """The storage URL with its password replaced by ***, safe to log."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1] if "@" in url else url


def _with_driver(url: str) -> str:
    """Names the PostgreSQL driver that is installed: SQLAlchemy 2.1 maps a bare postgresql:// to
    psycopg 3; where only psycopg2 is installed (an environment from before kdhar required psycopg 3),
    the URL names it."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return url  # make_storage reports it
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def has_password(url: str) -> bool:
    """Whether a storage URL carries a password."""
    try:
        return sqlalchemy.engine.make_url(url).password is not None
    except sqlalchemy.exc.ArgumentError:
        return mask_url(url) != url


def storage_from_options(storage: str | None, storage_file: str | None) -> str | None:
    """The storage URL given by `--storage` (one without a password) or by the first line of the file
    `--storage-file` names; None leaves it to $KDHAR_OPTUNA_STORAGE, else ./optuna.db.

    A password on the command line would show in the process list, and under `mlflow run` in the
    project run's params and its "Running command" log line, so it is refused.

    Raises:
        ValueError: both options, a password in `storage`, or an unreadable or empty file.
    """
    if storage and storage_file:
        raise ValueError("give --storage or --storage-file, not both")
    if storage:
        if has_password(storage):
            raise ValueError(f"--storage {mask_url(storage)}: a password on the command line shows in the process "
                             f"list and in MLflow's params and logs; set {STORAGE_ENV} to the URL instead, or put it "
                             "in a file and give --storage-file (-P storage_file=... with mlflow run)")
        return storage
    if not storage_file:
        return None
    try:
        lines = Path(storage_file).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--storage-file {storage_file}: cannot read it ({exc.strerror or exc})") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"--storage-file {storage_file} is empty: write the storage URL on its first line")
    return lines[0].strip()


def storage_url(url: str | None) -> str:
    """The storage to use: `url` if given, else $KDHAR_OPTUNA_STORAGE, else ./optuna.db."""
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def make_storage(url: str | None, heartbeat_interval: int = 60, grace_period: int | None = None) -> RDBStorage:
    """Opens (creating the tables if needed) the study database at `url` (None: ./optuna.db).

    Heartbeats every `heartbeat_interval` seconds let other workers fail a trial whose worker died
    (no heartbeat for `grace_period`, default twice the interval) and queue a retry of it.

    Raises:
        ValueError: a heartbeat interval below 1 s, or a grace period shorter than the interval.
        StorageUnavailableError: the URL is malformed or its database cannot be reached.
    """
    if heartbeat_interval < 1:
        raise ValueError(f"--heartbeat-interval {heartbeat_interval}: must be at least 1 second")
    if grace_period is not None and grace_period < heartbeat_interval:
        raise ValueError(f"--grace-period {grace_period}: must be at least the heartbeat interval "
                         f"({heartbeat_interval} s), or a live trial would be failed between two heartbeats")
    url = storage_url(url)
    shown = mask_url(url)
    with warnings.catch_warnings():
        # heartbeat_interval is flagged experimental; it is the documented way to survive dead workers
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            for attempt in range(3):
                try:
                    return RDBStorage(
                        _with_driver(url),
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                    )
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                    # Workers started together race to create the schema on an empty database; the
                    # loser sees a duplicate type/table and simply opens what the winner created.
                    if attempt == 2:
                        raise
                    time.sleep(1.0 + attempt)
        except sqlalchemy.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "connection failed"
            raise StorageUnavailableError(
                f"cannot reach the Optuna storage {shown}: {reason}; check that the database server is "
                "running and the URL (host, port, user, database) is right"
            ) from None
        except ImportError:
            raise StorageUnavailableError(
                f"Optuna storage {shown} needs a database driver that is not installed "
                "(PostgreSQL: pip install 'psycopg[binary]')"
            ) from None
        except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as exc:
            raise StorageUnavailableError(
                f"Optuna storage '{shown}' is not a usable database URL ({exc}); use e.g. "
                f"{DEFAULT_STORAGE} or postgresql://user@host:5432/optuna"
            ) from None


def dashboard_command(storage: str | None) -> str:
    """The shell command that opens optuna-dashboard on this storage, its password shown as ***."""
    return f"optuna-dashboard {mask_url(_with_driver(storage_url(storage)))}"


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


# ---------------------------------------------------------------------------- tuning
def tune(
    cfg: RunConfig,
    *,
    teacher: str,
    n_trials: int,
    study_name: str | None = None,
    storage: str | None = None,
    space: SearchSpace | None = None,
    pruner: str | optuna.pruners.BasePruner = "median",
    experiment: str = "kdhar",
    seed: int = 0,
    cache_teacher: bool = False,
    device: str | None = None,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs trials of a study until `n_trials` of them (all workers together) have finished.

    Re-running the same command continues the study; several workers started with the same
    arguments share the budget, and each returns only once the study is done. Everything the
    user can get wrong is checked before any trial.

    Args:
        cfg: the student run's configuration; `cfg.kd` is replaced per trial.
        teacher: as for `distill` (architecture, models:/ or runs:/ URI, checkpoint path).
        n_trials: the study's total budget, trials of earlier runs and other workers included.
        study_name: defaults to "kd-<student>-<teacher>".
        storage: a database URL; None is ./optuna.db (one worker). Use postgresql:// for several.
        space: ranges of tau, alpha or lam, and lr (`SearchSpace.parse`); default for cfg.kd.weighting.
        pruner: "median", "asha", "hyperband", "none" or an Optuna pruner; prunes on per-epoch
            validation accuracy.
        experiment: MLflow experiment of the parent and trial runs.
        seed: sampler seed; trial k samples with seed + k, so reruns and workers differ reproducibly.
        cache_teacher: reuse teacher logits across trials (see kdhar.cache).
        device: torch device name, or None for the best available.
        heartbeat_interval: seconds between a running trial's heartbeats.
        grace_period: seconds without a heartbeat before a trial counts as dead (default 2x interval).
        log: receives one line per trial this worker finishes (state, value, settings).

    Returns:
        A summary: study name, storage (password masked), trial counts, best value and params,
        total epochs trained, parent run id and the dashboard command.
    """
    from kdhar.distill import distill, resolve_teacher
    from kdhar.train import load_splits

    if n_trials < 1:
        raise ValueError(f"n_trials {n_trials} must be at least 1")
    if study_name is not None:
        check_study_name(study_name)
    if cache_teacher and cfg.data.views < 1:
        from kdhar.distill import CACHE_VIEWS

        # Trials are compared with each other, not with a scratch twin: any fixed view count will do.
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, views=CACHE_VIEWS))
    space = space or SearchSpace.default(cfg.kd.weighting, cfg.gkd.method)
    if cfg.data.val_fraction <= 0:
        raise ValueError("tuning needs a validation split: set data.val_fraction above 0 (the test split is never tuned on)")
    splits = load_splits(cfg)
    if splits.val is None:
        raise ValueError(f"the dataset at {cfg.data.root} leaves no validation groups; tuning needs some (raise val_fraction)")
    if resolve_teacher(teacher, splits.fingerprint, device or "cpu", attention=cfg.gkd.attention) is None:
        raise ValueError("tuning the KD settings needs a teacher; teacher=none has no distillation term to tune")
    # The dataset's fingerprint and the method are part of the default name: a study on other data,
    # or of another --kd method (whose search space differs), is another study.
    method = {"logit": "kd", "gkd": "gkd", "gkd+logit": "gkd-logit"}[cfg.gkd.method]
    study_name = check_study_name(
        study_name or f"{'pcl-' if cfg.pcl.ssl == 'pcl' else ''}{method}-{cfg.model.arch}-{_slug(teacher)}-"
                      f"{cfg.data.dataset}-{splits.fingerprint[:8]}")
    if isinstance(pruner, optuna.pruners.BasePruner):
        pruner_obj, pruner = pruner, type(pruner).__name__
    else:
        pruner_obj = make_pruner(pruner, cfg.optim.epochs)
    st = make_storage(storage, heartbeat_interval, grace_period)
    shown = mask_url(storage_url(storage))
    shared = study_config(cfg, space, teacher, splits.fingerprint)
    study, parent_id = _open_study(
        st, study_name, space, experiment, pruner_obj, shared=shared,
        params={"study_name": study_name, "storage": shown, "sampler": f"TPESampler(seed={seed}+trial)",
                "search_space": str(space), "pruner": pruner, "objective": OBJECTIVE, "teacher": teacher,
                "student": cfg.model.arch},
    )
    _absorb_project_run(experiment, study_name, parent_id)
    reconcile_study(study)

    ran: list[int] = []

    gate = _TrialGate(st, study_name)

    def objective(trial: optuna.Trial) -> float:
        gate.release()  # this trial is in the storage now: other workers' budget checks count it
        ran.append(trial.number)
        # A fresh sampler seeded by trial number: a resumed study and concurrent workers draw
        # distinct points (one shared seed would repeat them), yet a rerun draws the same ones.
        study.sampler = optuna.samplers.TPESampler(seed=seed + trial.number)
        values = _suggest(trial, space)
        # A pair_key of their own: trials differ in their searched settings, and grouping the runs
        # table by pair_key should show a KD run beside its scratch twin, not a study's trials.
        tags = {TAG_STUDY: study_name, TAG_TRIAL: str(trial.number), TAG_STATE: "RUNNING", "pair_key": f"study-{study_name}"}
        retry_of = _retried_number(study, trial.number)
        if retry_of is not None:
            tags[TAG_RETRY_OF] = str(retry_of)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[OBJECTIVE], epoch)
            if trial.should_prune():
                raise StopTraining("pruned")

        try:
            res = distill(
                trial_config(cfg, values),
                teacher=teacher, experiment=experiment, parent_run_id=parent_id, epoch_callback=on_epoch,
                register=False, cache_teacher=cache_teacher, progress=False, extra_tags=tags, device=device,
                run_name=f"trial-{trial.number}",
            )
        except BaseException:
            for run_id in _trial_run_ids(experiment, study_name, trial.number):
                _tag_run(experiment, run_id, {TAG_STATE: "FAIL"}, status=tracking.run_status(run_id))
            raise
        trial.set_user_attr("mlflow_run_id", res.run_id)
        trial.set_user_attr("epochs", len(res.history))
        if res.stopped == "pruned":
            _tag_run(experiment, res.run_id, {TAG_STATE: "PRUNED"})
            raise optuna.TrialPruned(f"pruned after epoch {len(res.history)}")
        if res.history and res.history[-1].get("collapsed"):
            # A stuck student's accuracy is chance whatever the settings nearby: a failure of
            # these settings, not a low score for the sampler to interpolate.
            reason = (f"collapsed: stuck at train accuracy {res.history[-1]['train_acc']:.3f}, at most "
                      f"{STUCK_ACC_FACTOR:g}x chance ({_fmt(values)})")
            trial.set_user_attr("fail_reason", reason)
            _tag_run(experiment, res.run_id, {TAG_STATE: "FAIL", "fail_reason": reason})
            raise TrialCollapsed(reason)
        _tag_run(experiment, res.run_id, {TAG_STATE: "COMPLETE"})
        return float(res.final[f"best_{OBJECTIVE}"])

    def stop_when_full(study_: optuna.Study, trial: FrozenTrial) -> None:
        if log is not None:
            value = f"{OBJECTIVE} {trial.value:.3f}" if trial.value is not None else trial.user_attrs.get("fail_reason", "")
            log(f"trial {trial.number} {trial.state.name.lower()}: {value} ({_fmt(trial.params)})".replace(" ()", ""))
        if not _budget_left(study_, n_trials, poll_s, gate):
            study_.stop()

    # Optimize's own n_trials counts this worker's trials only; the budget is the study's.
    poll_s = min(float(heartbeat_interval), 5.0)
    try:
        if _budget_left(study, n_trials, poll_s, gate):
            study.optimize(objective, callbacks=[stop_when_full], catch=(TrialCollapsed,))
    finally:
        gate.close()
    reconcile_study(study)
    summary = summarize(study, storage)
    _log_study_to_parent(study, parent_id, experiment, summary, plots=bool(ran))
    return summary


class TrialCollapsed(RuntimeError):
    """A trial whose student is stuck (tagged collapsed); Optuna records it as FAIL with this reason."""


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in values.items())


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


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.rsplit("/", 1)[-1])[:60]


def study_config(cfg, space: SearchSpace, teacher: str, fingerprint: str) -> dict[str, Any]:
    """Everything that changes what a trial's score measures except the searched knobs: the run
    configuration (epochs, fraction, widths, clips, PCL, ...), the teacher and the data's fingerprint."""
    searched = {"tau": "kd.tau", "alpha": "kd.alpha", "lam": "kd.lam", "lr": "optim.lr", "beta": "gkd.beta",
                "ramp": "gkd.ramp", "rec_weight": "gkd.rec_weight", "gd_weight": "gkd.gd_weight"}
    skip = OPERATIONAL | {searched[n] for n in space.names()}
    shared = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.params(kd=True).items() if k not in skip}
    return {**shared, "teacher": teacher, "dataset_fingerprint": fingerprint}


def _open_study(
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
    parent_id = _create_parent(experiment, name, params)
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
        parent_id = found[0]["run_id"] if found else _create_parent(experiment, study.study_name, params)
        study.set_user_attr(ATTR_PARENT, parent_id)
    return parent_id


def _create_parent(experiment: str, name: str, params: dict[str, Any]) -> str:
    description = (f"Optuna study '{name}': tunes {params.get('search_space', '')} of {params.get('student', '')} "
                   f"distilled from {params.get('teacher', '')}, maximising {OBJECTIVE} on the validation split. "
                   "Each trial is a child run (trial-N); the best value and the study's plots are logged here.")
    tags = {TAG_STUDY: name, "role": "tuning", "mlflow.note.content": description}
    with tracking.RunTracker(experiment, run_name=f"tune-{name}", tags=tags) as run:
        run.log_params(params)
        return run.run_id


def _absorb_project_run(experiment: str, study_name: str, parent_id: str) -> None:
    """Under `mlflow run`, MLflow hands its own run over in MLFLOW_RUN_ID and the next new run
    silently becomes it. The worker that creates the study uses it as the parent; any other worker
    would turn it into a trial run outside the study, so record it as a worker run under the parent."""
    project_run = os.environ.get("MLFLOW_RUN_ID")
    if not project_run or project_run == parent_id:
        return
    tags = {TAG_STUDY: study_name, "role": "tuning-worker", "mlflow.parentRunId": parent_id,
            "mlflow.note.content": f"A worker that joined the Optuna study '{study_name}'; its trials are under tune-{study_name}."}
    with tracking.RunTracker(experiment, run_name=f"worker-{study_name}", tags=tags):
        pass


def _budget_left(study: optuna.Study, n_trials: int, poll_s: float, gate: _TrialGate) -> bool:
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


class _TrialGate:
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


def _retried_number(study: optuna.Study, number: int) -> int | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number == number:
                return RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
    return None


def _trial_run_ids(experiment: str, study_name: str, number: int) -> list[str]:
    found = tracking.find_runs(experiment, f"tags.{TAG_STUDY} = '{study_name}' and tags.{TAG_TRIAL} = '{number}'")
    return [r["run_id"] for r in found]


def _tag_run(experiment: str, run_id: str, tags: dict[str, str], status: str | None = None) -> None:
    """Sets tags on an ended run by re-opening it, then leaves it with `status` (default FINISHED)."""
    with tracking.RunTracker(experiment, resume_run_id=run_id) as run:
        run.set_tags(tags)
    if status is not None and status != "FINISHED":
        tracking.end_run_as(run_id, status)


# ---------------------------------------------------------------------------- dead workers
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
        candidates = _trial_run_ids(experiment, study.study_name, t.number)
        for run_id in dict.fromkeys(candidates):
            if tracking.run_status(run_id) == "RUNNING":
                _tag_run(experiment, run_id, {TAG_STATE: "FAIL"}, status="KILLED")
                ended.append(run_id)
    return ended


# ---------------------------------------------------------------------------- results
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


def _log_study_to_parent(
    study: optuna.Study, parent_id: str, experiment: str, summary: dict[str, Any], plots: bool
) -> None:
    """Best values and, when `plots`, the study's plots on the parent run (each worker that ran
    trials refreshes them when it finishes)."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = summary["complete"]
    with tracking.RunTracker(experiment, resume_run_id=parent_id) as run:
        metrics = {"n_complete": complete, "n_pruned": summary["pruned"], "n_failed": summary["failed"],
                   "epochs_total": summary["epochs"]}
        if summary["best_params"]:
            metrics.update({f"best_{k}": v for k, v in summary["best_params"].items()})
            metrics[f"best_{OBJECTIVE}"] = summary["best_value"]
            run.set_tags({"best_trial": str(summary["best_trial"])})
        run.log_metrics(metrics, step=len(study.trials))
        if complete == 0 or not plots:
            return
        names = list(summary["best_params"] or [])
        figures = {"optimization_history.png": lambda: ovm.plot_optimization_history(study),
                   "slice.png": lambda: ovm.plot_slice(study, params=names)}
        notes = []
        if complete >= 2 and len(names) >= 2:
            figures["contour.png"] = lambda: ovm.plot_contour(study, params=names[:2])
            figures["param_importances.png"] = lambda: ovm.plot_param_importances(study)
        else:
            notes.append("parameter importances and the contour need at least 2 complete trials of 2+ parameters")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            for name, plot in figures.items():
                ax = plot()
                fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
                run.log_figure(fig, f"optuna/{name}")
                plt.close(fig)
        run.log_dict({"summary": {k: v for k, v in summary.items() if k != "dashboard"}, "notes": notes},
                     "optuna/summary.json")


__all__ = [
    "DEFAULT_STORAGE", "STORAGE_ENV", "storage_url", "storage_from_options", "SearchSpace", "ParamRange", "StorageUnavailableError", "tune", "reconcile",
    "reconcile_study", "summarize", "make_storage", "make_pruner", "mask_url", "dashboard_command", "best_settings",
]
