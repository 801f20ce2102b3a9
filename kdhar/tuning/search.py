"""`tune`: a worker's part of a study, from checking its inputs to the summary it returns. Each
trial is one `distill` run with the trial's values (`TrialObjective`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from kdhar import tracking
from kdhar.config import RunConfig
from kdhar.objectives.stuck import STUCK_ACC_FACTOR
from kdhar.train import RunResult, Splits, StopTraining
from kdhar.tuning.keep import ATTR_RUN_ID, ATTR_RUN_IDS, prune_trial_checkpoints
from kdhar.tuning.runs import TAG_RETRY_OF, TAG_STATE, TAG_STUDY, TAG_TRIAL, absorb_project_run, \
    log_study_to_parent, tag_run, trial_run_ids
from kdhar.tuning.space import OBJECTIVE, SearchSpace, study_config, suggest, trial_config
from kdhar.tuning.storage import make_storage, mask_url, storage_url
from kdhar.tuning.study import TrialGate, budget_left, check_study_name, make_pruner, open_study, reconcile_study, \
    retried_number, slug, summarize


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
    val_seeds: int = 1,
) -> dict[str, Any]:
    """Runs trials of a study until `n_trials` of them (all workers together) have finished.

    Re-running the same command continues the study; several workers started with the same
    arguments share the budget, and each returns only once the study is done. Everything the
    user can get wrong is checked before any trial.

    Args:
        cfg: the student run's configuration; `cfg.kd` is replaced per trial.
        teacher: as for `distill` (architecture, models:/ or runs:/ URI, checkpoint path), or "none":
            the study tunes the lr of scratch runs, so a scratch twin gets the same tuning budget.
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
        val_seeds: runs per trial, seeds cfg.optim.seed, +1, ...; each holds out its own validation
            groups (`group_holdout` is seeded), and the trial's score is the mean of their best
            validation accuracies. The pruner sees the first seed's epochs only.

    Returns:
        A summary: study name, storage (password masked), trial counts, best value and params,
        total epochs trained, parent run id and the dashboard command.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials {n_trials} must be at least 1")
    if val_seeds < 1:
        raise ValueError(f"val_seeds {val_seeds} must be at least 1")
    if study_name is not None:
        check_study_name(study_name)
    scratch = teacher.lower() == "none"
    cache_teacher = cache_teacher and not scratch
    cfg = _views_for_cache(cfg, cache_teacher)
    space = _checked_space(space or SearchSpace.default(cfg.kd.weighting, cfg.gkd.method, scratch), scratch)
    splits = _checked_splits(cfg, teacher, device)
    study_name = check_study_name(study_name or default_study_name(cfg, teacher, splits.fingerprint))
    pruner_obj, pruner = _pruner(pruner, cfg.optim.epochs)
    st = make_storage(storage, heartbeat_interval, grace_period)
    params = {"study_name": study_name, "storage": mask_url(storage_url(storage)),
              "sampler": f"TPESampler(seed={seed}+trial)", "search_space": str(space), "pruner": pruner,
              "objective": OBJECTIVE, "teacher": teacher, "student": cfg.model.arch, "val_seeds": val_seeds}
    study, parent_id = open_study(st, study_name, space, experiment, pruner_obj, params=params,
                                  shared=study_config(cfg, space, teacher, splits.fingerprint, val_seeds))
    absorb_project_run(experiment, study_name, parent_id)
    reconcile_study(study)
    objective = TrialObjective(cfg, teacher, space, study, parent_id, experiment, seed, cache_teacher, device,
                               TrialGate(st, study_name), val_seeds=val_seeds)
    _optimize(study, objective, n_trials, min(float(heartbeat_interval), 5.0), log)
    reconcile_study(study)
    prune_trial_checkpoints(study)
    summary = summarize(study, storage)
    log_study_to_parent(study, parent_id, experiment, summary, plots=bool(objective.ran))
    return summary


def _pruner(pruner: str | optuna.pruners.BasePruner, epochs: int) -> tuple[optuna.pruners.BasePruner, str]:
    """The pruner and the name the parent run records for it."""
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner, type(pruner).__name__
    return make_pruner(pruner, epochs), pruner


def _views_for_cache(cfg: RunConfig, cache_teacher: bool) -> RunConfig:
    """`cfg` with replayable views when teacher logits are cached and it has none."""
    if not cache_teacher or cfg.data.views >= 1:
        return cfg
    from kdhar.distill import CACHE_VIEWS

    # Trials are compared with each other, not with a scratch twin: any fixed view count will do.
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, views=CACHE_VIEWS))


def _checked_space(space: SearchSpace, scratch: bool) -> SearchSpace:
    """`space`, if it searches something that acts: without a teacher, the lr alone.

    Raises:
        ValueError: nothing searched, or a KD knob searched for runs without a teacher.
    """
    if not space.names():
        raise ValueError("the search space searches nothing; give a range to at least one parameter (e.g. lr=0.005:0.05:log)")
    knobs = [n for n in space.names() if n != "lr"]
    if scratch and knobs:
        raise ValueError(f"{', '.join(knobs)} do not act without a teacher: --teacher none tunes the lr of scratch "
                         "runs; leave them out of the search space")
    return space


def _checked_splits(cfg: RunConfig, teacher: str, device: str | None) -> Splits:
    """The run's splits, once a validation split exists and the teacher is one every trial can learn
    from: the checks `distill` makes before training (class set, clip size, and for GKD the teacher's
    attention module and CVAE) are made here once, so a teacher no trial could use is refused in one
    line before the study opens, not by a failed first trial.

    Raises:
        ValueError: no validation fraction or groups (the test split is never tuned on), or a teacher
            (unless "none") the student cannot learn from.
    """
    from kdhar.distill import check_teacher_clips, resolve_teacher
    from kdhar.objectives import build_objective
    from kdhar.train import check_same_classes, load_splits

    if cfg.data.val_fraction <= 0:
        raise ValueError("tuning needs a validation split: set data.val_fraction above 0 (the test split is never tuned on)")
    splits = load_splits(cfg)
    if splits.val is None:
        raise ValueError(f"the dataset at {cfg.data.root} leaves no validation groups; tuning needs some (raise val_fraction)")
    if teacher.lower() != "none":
        resolved = resolve_teacher(teacher, splits.fingerprint, device or "cpu", attention=cfg.gkd.attention)
        check_same_classes(f"teacher {resolved.uri}", resolved.classes, splits.classes)
        check_teacher_clips(resolved, cfg)
        build_objective(cfg, resolved)  # GKD: loads the teacher's attention module and CVAE, or says how to train them
    return splits


def default_study_name(cfg: RunConfig, teacher: str, fingerprint: str) -> str:
    """kd|gkd|gkd-logit (scratch|attention without a teacher), student, teacher, dataset and its
    fingerprint: a study on other data, or of another --kd method (whose search space differs), is
    another study."""
    if teacher.lower() == "none":
        method = "scratch" if cfg.gkd.method == "logit" else "attention"
        return (f"{'pcl-' if cfg.pcl.ssl == 'pcl' else ''}{method}-{cfg.model.arch}-{cfg.data.dataset}-"
                f"{fingerprint[:8]}")
    method = {"logit": "kd", "feature": "feature-kd", "gkd": "gkd", "gkd+logit": "gkd-logit"}[cfg.gkd.method]
    return (f"{'pcl-' if cfg.pcl.ssl == 'pcl' else ''}{method}-{cfg.model.arch}-{slug(teacher)}-"
            f"{cfg.data.dataset}-{fingerprint[:8]}")


def _optimize(study: optuna.Study, objective: TrialObjective, n_trials: int, poll_s: float,
              log: Callable[[str], None] | None) -> None:
    """Runs trials until the study's budget is spent; Optimize's own n_trials counts this worker's
    trials only, so a callback stops it when the study is full."""
    gate = objective.gate

    def stop_when_full(study_: optuna.Study, trial: FrozenTrial) -> None:
        prune_trial_checkpoints(study_)
        if log is not None:
            value = f"{OBJECTIVE} {trial.value:.3f}" if trial.value is not None else trial.user_attrs.get("fail_reason", "")
            log(f"trial {trial.number} {trial.state.name.lower()}: {value} ({_fmt(trial.params)})".replace(" ()", ""))
        if not budget_left(study_, n_trials, poll_s, gate):
            study_.stop()

    try:
        if budget_left(study, n_trials, poll_s, gate):
            study.optimize(objective, callbacks=[stop_when_full], catch=(TrialCollapsed,))
    finally:
        gate.close()


class TrialCollapsed(RuntimeError):
    """A trial whose student is stuck (tagged collapsed); Optuna records it as FAIL with this reason."""


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in values.items())


@dataclass
class TrialObjective:
    """Optuna's objective: one trial is a `distill` run with the trial's values (one per validation
    seed), nested under the study's parent run, pruned on the first run's per-epoch validation
    accuracy and scored by the mean of the runs' best."""

    cfg: RunConfig
    teacher: str
    space: SearchSpace
    study: optuna.Study
    parent_id: str
    experiment: str
    seed: int
    cache_teacher: bool
    device: str | None
    gate: TrialGate
    ran: list[int] = field(default_factory=list)  # the trial numbers this worker ran
    val_seeds: int = 1

    def __call__(self, trial: optuna.Trial) -> float:
        self.gate.release()  # this trial is in the storage now: other workers' budget checks count it
        self.ran.append(trial.number)
        # A fresh sampler seeded by trial number: a resumed study and concurrent workers draw
        # distinct points (one shared seed would repeat them), yet a rerun draws the same ones.
        self.study.sampler = optuna.samplers.TPESampler(seed=self.seed + trial.number)
        values = suggest(trial, self.space)
        scores, epochs, run_ids = [], 0, []
        for k in range(self.val_seeds):
            res = self._run(trial, values, k)
            epochs, run_ids = epochs + len(res.history), [*run_ids, res.run_id]
            trial.set_user_attr(ATTR_RUN_ID, run_ids[0])
            if self.val_seeds > 1:
                trial.set_user_attr(ATTR_RUN_IDS, run_ids)
            trial.set_user_attr("epochs", epochs)
            scores.append(self._score(trial, res, values))
        if self.val_seeds > 1:
            trial.set_user_attr("val_scores", scores)
        return sum(scores) / len(scores)

    def _tags(self, trial: optuna.Trial) -> dict[str, str]:
        # A pair_key of their own: trials differ in their searched settings, and grouping the runs
        # table by pair_key should show a KD run beside its scratch twin, not a study's trials.
        name = self.study.study_name
        tags = {TAG_STUDY: name, TAG_TRIAL: str(trial.number), TAG_STATE: "RUNNING", "pair_key": f"study-{name}"}
        retry_of = retried_number(self.study, trial.number)
        if retry_of is not None:
            tags[TAG_RETRY_OF] = str(retry_of)
        return tags

    def _run(self, trial: optuna.Trial, values: dict[str, float], k: int = 0) -> RunResult:
        """The trial's distill run for its k-th validation seed; if it raises, the trial's MLflow
        runs are tagged FAIL first."""
        from kdhar.distill import distill

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[OBJECTIVE], epoch)
            if trial.should_prune():
                raise StopTraining("pruned")

        cfg = trial_config(self.cfg, values)
        seed = cfg.optim.seed + k
        name = f"trial-{trial.number}" + (f"-s{seed}" if self.val_seeds > 1 else "")
        try:
            return distill(
                dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, seed=seed)),
                teacher=self.teacher, experiment=self.experiment, parent_run_id=self.parent_id,
                epoch_callback=on_epoch if k == 0 else None, register=False, cache_teacher=self.cache_teacher,
                progress=False, extra_tags=self._tags(trial), device=self.device, run_name=name,
                stage_models=False,  # a trial's models are never scored or fine-tuned
            )
        except BaseException:
            for run_id in trial_run_ids(self.experiment, self.study.study_name, trial.number):
                tag_run(self.experiment, run_id, {TAG_STATE: "FAIL"}, status=tracking.run_status(run_id))
                trial.set_user_attr(ATTR_RUN_ID, run_id)  # so its checkpoints are found and pruned
            raise

    def _score(self, trial: optuna.Trial, res: RunResult, values: dict[str, float]) -> float:
        """The run's best validation accuracy; raises for a pruned or collapsed run, tagging it."""
        if res.stopped == "pruned":
            tag_run(self.experiment, res.run_id, {TAG_STATE: "PRUNED"})
            raise optuna.TrialPruned(f"pruned after epoch {len(res.history)}")
        if res.history and res.history[-1].get("collapsed"):
            # A stuck student's accuracy is chance whatever the settings nearby: a failure of
            # these settings, not a low score for the sampler to interpolate.
            reason = (f"collapsed: stuck at train accuracy {res.history[-1]['train_acc']:.3f}, at most "
                      f"{STUCK_ACC_FACTOR:g}x chance ({_fmt(values)})")
            trial.set_user_attr("fail_reason", reason)
            tag_run(self.experiment, res.run_id, {TAG_STATE: "FAIL", "fail_reason": reason})
            raise TrialCollapsed(reason)
        tag_run(self.experiment, res.run_id, {TAG_STATE: "COMPLETE"})
        return float(res.final[f"best_{OBJECTIVE}"])
