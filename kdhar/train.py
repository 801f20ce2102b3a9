"""One training run, end to end: data, model, objective, engine, checkpoints and tracking.

Every entry point (train_teacher, distill, finetune, each tuning trial, each grid cell) goes through
`run_training`, so they all log, checkpoint and resume the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdhar import distributed, tracking
from kdhar.checkpoint import load_checkpoint, save_checkpoint
from kdhar.config import RunConfig, check_run_config
from kdhar.data.dataset import ReplayLoader, VideoClipDataset, make_loader
from kdhar.data.index import fingerprint
from kdhar.data.splits import Splits, load_splits
from kdhar.engine import (Plateau, evaluate, evaluate_terms, make_scheduler, pick_device, rng_state, set_determinism,
                          set_rng_state, train_one_epoch)
from kdhar.models import build_model
from kdhar.objectives import Objective, Teacher, build_objective
from kdhar.plots import confusion_figure, curves_figure

# The paper reports accuracy after 50, 150 and 200 of 200 epochs; we keep the same fractions of any run.
STAGES = {"early": 0.25, "mid": 0.75, "late": 1.0}
# Decoded evaluation clips kept in memory between epochs, per split (the CPU preset's test split is
# ~100 MB; a paper-size one does not fit and is decoded every epoch as before).
EVAL_REPLAY_BYTES = 512 * 2**20
# Decoded training videos kept in memory per process (uint8 at the decoder's size): the synthetic
# UCF101 train split is ~370 MB at the CPU preset, so its epochs after the first decode nothing;
# UCF101 itself does not fit and is decoded as before once the budget is spent.
TRAIN_FRAME_CACHE_BYTES = 1024 * 2**20


class StopTraining(Exception):
    """Raised by an epoch callback to end a run early (e.g. a pruned tuning trial)."""


@dataclass
class RunResult:
    run_id: str
    final: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: str | None = None
    model_uri: str | None = None


def stage_epochs(epochs: int) -> dict[str, int]:
    """1-based epoch at which each paper stage is read off (early/mid/late)."""
    return {name: max(1, math.ceil(frac * epochs)) for name, frac in STAGES.items()}


# Knobs added after runs were already being identified by their hash: at these values they behave
# as before the knob existed, so they are left out of the hash and earlier runs keep their identity.
HASH_NEUTRAL = {"model.modality": "rgb", "optim.sync_bn": False}


def config_hash(cfg: RunConfig, teacher: str | None, init: str | None) -> str:
    """Identifies a run's configuration, so a grid can skip cells that already finished.

    The KD knobs count only for runs with a teacher: changing them retrains no teacher or scratch run.
    """
    params = {k: v for k, v in cfg.params(kd=teacher is not None).items() if HASH_NEUTRAL.get(k, object()) != v}
    payload = json.dumps({**params, "teacher": teacher, "init": init}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_same_classes(source: str, classes: list[str], dataset_classes: list[str]) -> None:
    """Refuses a model whose class set differs from the dataset's (before any training)."""
    if list(classes) != list(dataset_classes):
        raise ValueError(
            f"{source} was trained on {len(classes)} classes ({', '.join(classes[:3])}, ...) but the "
            f"dataset has {len(dataset_classes)} ({', '.join(dataset_classes[:3])}, ...); use a model "
            "trained on the same class set"
        )


def _epoch_metrics(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    keys = ("clip_top1", "clip_top5", "video_top1", "mean_class_acc", "loss")
    return {f"{prefix}_{k}": float(result[k]) for k in keys if k in result}


# Knobs a resumed run may change freely (how data is read, not what is trained) and those it may
# change only when asked to (`allow_config_change`): more epochs, another thread count.
RESUME_FREE = {"data.num_workers", "data.on_missing", "data.on_bad"}
RESUME_ALLOWED = {"optim.epochs", "optim.threads"}


class ResumeError(ValueError):
    """A checkpoint that cannot continue as asked; the message names the checkpoint and the fix."""


def check_resume(
    path: str | Path, state: dict[str, Any], cfg: RunConfig, kd: bool, allow: bool, finished: bool
) -> dict[str, tuple]:
    """The configuration changes between a checkpoint and the command resuming it, as key -> (was,
    now), once they are acceptable. `finished`: the checkpoint's MLflow run ended FINISHED.

    Raises:
        ResumeError: a change other than RESUME_FREE (and, with `allow`, RESUME_ALLOWED), or a
            finished run that has no epochs left to train.
    """
    missing = object()
    # Checkpoints from before a knob existed were at its neutral value.
    stored = {**HASH_NEUTRAL, **state.get("config", {})}
    wanted = {k: _plain(v) for k, v in cfg.params(kd=kd).items()}
    changed = {k: (stored[k], v) for k, v in wanted.items()
               if k not in RESUME_FREE and stored.get(k, missing) not in (missing, v)}
    refused = {k: c for k, c in changed.items() if not (allow and k in RESUME_ALLOWED)}
    if refused:
        diff = ", ".join(f"{k} {was!r} -> {now!r}" for k, (was, now) in sorted(refused.items()))
        hint = (f"; only {', '.join(sorted(RESUME_ALLOWED))} may change, with --allow-config-change"
                if not set(refused) - RESUME_ALLOWED else "; add --allow-config-change to accept this")
        raise ResumeError(f"--resume {path}: the run was trained with other settings ({diff}); give the "
                          f"same options to continue it, or leave --resume out to start a new run{hint}")
    if finished and state["epoch"] >= cfg.optim.epochs:
        raise ResumeError(f"--resume {path}: run {state.get('run_id')} already trained all {state['epoch']} epochs; "
                          "nothing to continue (to train longer: --epochs N --allow-config-change)")
    return changed


def run_training(
    cfg: RunConfig,
    *,
    role: str,
    experiment: str,
    init_state: dict[str, torch.Tensor] | None = None,
    run_name: str | None = None,
    resume: str | None = None,
    allow_config_change: bool = False,
    workdir: str | Path = "runs",
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
    register: bool = True,
    objective: Objective | None = None,
    device: str | None = None,
    progress: bool = True,
) -> RunResult:
    """Trains one model and logs everything to the tracking store.

    Args:
        cfg: the run's configuration.
        role: "teacher", "student" or "finetune"; a tag used by reports and teacher lookup.
        experiment: MLflow experiment name.
        objective: what the run optimises (`kdhar.objectives.build_objective`); None is plain
            supervised training.
        init_state: weights to start from (classifier weights of a different shape are skipped).
        resume: a checkpoint path to continue from; the same MLflow run is re-opened. The
            checkpoint's configuration must match `cfg` (see `check_resume`).
        allow_config_change: let a resumed run change the RESUME_ALLOWED knobs (tagged on the run).
        epoch_callback: called after each epoch with its metrics; may raise StopTraining.

    Under torchrun (WORLD_SIZE > 1) the run is data-parallel (`kdhar.distributed`): every rank
    trains its share of each global batch, rank 0 alone tracks, evaluates, checkpoints and
    registers, and a job torchrun restarts (--max-restarts) resumes from rank 0's last checkpoint.
    """
    check_run_config(cfg)
    objective = objective or build_objective(cfg)
    teacher = objective.teacher
    dev = pick_device(device)
    ddp = distributed.setup(dev)
    main = ddp is None or ddp.main
    if ddp is not None:
        dev = ddp.device(dev)
        progress = progress and main
        if main and not resume and ddp.restarts:
            resume = distributed.job_checkpoint(workdir)  # the job's earlier attempt died: continue it
            if resume:
                print(f"[{role} {cfg.model.arch}] restarted job: resuming from {resume}", file=sys.stderr, flush=True)
        elif main and not ddp.restarts:
            distributed.forget_job(workdir)
    # Rank 0 reads and checks the checkpoint and hands it on: the ranks must continue from one
    # state, and rank 0's files need not be on the other nodes.
    state = load_checkpoint(resume) if resume and main else None
    changed = {}
    if state is not None:
        finished = tracking.run_status(state["run_id"]) == "FINISHED"
        changed = check_resume(resume, state, cfg, teacher is not None, allow_config_change, finished)
    if ddp is not None:
        state, resume = ddp.broadcast_object((state, resume))
    torch.set_num_threads(cfg.optim.threads)
    det_note = set_determinism(cfg.optim.seed, cfg.optim.deterministic)
    splits = load_splits(cfg)
    if teacher is not None:
        check_same_classes(f"teacher {teacher.uri}", teacher.classes, splits.classes)
    num_classes = len(splits.classes)
    clip, optim = cfg.clip, cfg.optim

    view = TrainingView.build(objective, cfg, splits)
    train_ds = view.train
    eval_sets = {}
    if objective.labels:  # label-free pretraining has no classifier to score
        eval_sets["test"] = VideoClipDataset(splits.test, clip, train=False, on_bad=cfg.data.on_bad)
        if splits.val is not None:
            eval_sets["val"] = VideoClipDataset(splits.val, clip, train=False, on_bad=cfg.data.on_bad)
    pin = dev.type == "cuda"
    workers = cfg.data.num_workers
    train_batch = ddp.per_rank_batch(optim.batch_size) if ddp else optim.batch_size
    train_loader = make_loader(train_ds, train_batch, shuffle=True, num_workers=workers, seed=optim.seed, pin_memory=pin,
                               shard=(ddp.rank, ddp.world) if ddp else None)

    def replay(ds) -> ReplayLoader:
        return ReplayLoader(make_loader(ds, optim.batch_size, shuffle=False, num_workers=workers, seed=optim.seed,
                                        pin_memory=pin), EVAL_REPLAY_BYTES)

    eval_loaders = {name: replay(ds) for name, ds in eval_sets.items()}
    val_loader = replay(view.validation) if view.validation is not None else None

    model = build_model(cfg.model.arch, num_classes, width=cfg.model.width, dropout=cfg.model.dropout,
                        modality=cfg.model.modality)
    step = objective.make_step(model, len(train_ds)).to(dev)  # moves a step's frozen teacher too
    model = step.model  # the network as trained and logged (a step may wrap the plain one with its own parts)
    if init_state is not None:  # after the wrapping, so the wrapper's own weights load too
        load_compatible(model, init_state)
    if ddp is not None and optim.sync_bn:
        distributed.sync_batchnorm(step, dev)
    # A step may train in several passes per epoch, each over the whole training set with its own
    # parameters (see the step's `passes`); "net" is the pass the configured SGD, schedule
    # and warm-up drive, the others bring their optimiser.
    passes = getattr(step, "passes", ("net",))
    net_params = step.pass_parameters("net") if len(passes) > 1 else step.parameters()
    # Over the step's parameters: the model's and any heads of the method's own.
    optimizer = torch.optim.SGD(net_params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    side_optimizers = {name: step.pass_optimizer(name) for name in passes if name != "net"}
    steps_per_epoch = max(1, len(train_loader))
    warmup_steps = round(optim.warmup * steps_per_epoch)
    plateau = Plateau(optim.lr) if optim.schedule == "plateau" else None
    scheduler = make_scheduler(optimizer, optim.schedule, optim.epochs * steps_per_epoch, warmup_steps, plateau)

    start_epoch, history, run_id = 0, [], None
    if state is not None:
        model.load_state_dict(state["model"])
        step.load_state_dict(state.get("heads", {}), strict=False)
        optimizer.load_state_dict(state["optimizer"])
        for name, side in side_optimizers.items():
            side.load_state_dict(state["side_optimizers"][name])
        scheduler.load_state_dict(state["scheduler"])
        if plateau is not None and "plateau" in state:
            plateau.load_state_dict(state["plateau"])
        start_epoch, history, run_id = state["epoch"], state["history"], state["run_id"]
        set_rng_state(state["rng"])
    if ddp is not None:
        ddp.broadcast_module(step)  # every rank starts from rank 0's weights

    run_tags = {
        "role": role,
        "arch": cfg.model.arch,
        "dataset": cfg.data.dataset,
        "dataset_fingerprint": splits.fingerprint,
        "config_hash": config_hash(cfg, teacher.uri if teacher else None, None),
        "fraction": str(cfg.data.fraction),
        "seed": str(optim.seed),
        "teacher_arch": (teacher.arch or "unknown") if teacher else "none",
        "views": str(cfg.data.views),
        "torch_version": torch.__version__,
        "threads": str(cfg.optim.threads),
        "modality": cfg.model.modality,
        **({"world_size": str(ddp.world)} if ddp else {}),
        **({"elastic_restarts": str(ddp.restarts)} if ddp and ddp.restarts else {}),
        # Which process trains the run, so a grid rerun can tell a run whose process died (SIGKILL,
        # out of memory) from one still training, and resume it.
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        **objective.tags,
        **(tags or {}),
    }
    if changed:
        run_tags["resumed_with_changes"] = ", ".join(f"{k} {was} -> {now}" for k, (was, now) in sorted(changed.items()))
    run_tags["mlflow.note.content"] = describe_run(cfg, role, teacher, splits, objective.description)
    git = tracking.git_commit()
    if git:
        run_tags["git_commit"] = git
    amp = torch.bfloat16 if dev.type == "cuda" else None
    stages = stage_epochs(optim.epochs)

    name = run_name or default_run_name(cfg, role, teacher, objective.name_prefix)
    run_tracker = (tracking.RunTracker(experiment, run_name=name, tags=run_tags, resume_run_id=run_id,
                                       parent_run_id=parent_run_id) if main else distributed.NullTracker(run_id, name))
    with run_tracker as tracker:
        run_id = tracker.run_id if ddp is None else ddp.broadcast_object(tracker.run_id)
        if not resume:
            params = {**cfg.params(kd=False), **objective.params, "role": role, "device": str(dev), "num_classes": num_classes}
            params.update({"train_videos": len(splits.train.samples), "test_videos": len(splits.test.samples)})
            params["val_videos"] = len(splits.val.samples) if splits.val else 0
            if teacher is not None:
                params.update({"teacher.uri": teacher.uri, "teacher.run_id": teacher.run_id or "", "teacher.arch": teacher.arch or ""})
            tracker.log_params(params)
            tracker.log_dict({"classes": splits.classes}, "classes.json")
            # Lineage: which data (content digest of the full training list) and how each part was used.
            subset = f"-f{cfg.data.fraction:g}" if cfg.data.fraction < 1 else ""  # only training is subsampled
            parts = {f"train{subset}": splits.train, "validation": splits.val, "test": splits.test}
            for label, part in parts.items():
                if part is not None:
                    tracker.log_dataset(f"{cfg.data.dataset}-split{cfg.data.split}-{label}", fingerprint(part),
                                        cfg.data.root, label.split("-")[0])
            tracker.log_dict(cfg.params(kd=teacher is not None) | {"determinism": det_note}, "config.json")
            if splits.missing:
                tracker.log_metrics({"missing_videos": splits.missing}, step=0)
            if view.too_short:
                tracker.log_metrics({"too_short_videos": view.too_short}, step=0)
        ckpt_path = Path(workdir) / "checkpoints" / run_id / "last.pt"
        stopped: str | None = None
        last_test: dict[str, Any] | None = None  # the test scores of the weights as they are now
        watch = objective.collapse_term
        # The watched loss where training starts (the first batch, before any step); kept in the
        # history so that a resumed run still has it.
        start_loss = history[0].get(f"start_{watch}") if history and watch else None
        for epoch in range(start_epoch, optim.epochs):
            train_ds.set_epoch(epoch)
            if hasattr(step, "set_epoch"):
                step.set_epoch(epoch)
            batches = train_loader if objective.batch_extras is None else _WithExtras(train_loader, objective.batch_extras)
            side_metrics = {}
            for name, side in side_optimizers.items():
                step.set_pass(name)
                side_stats = train_one_epoch(
                    step, batches, side, dev, amp_dtype=amp, progress=progress, epoch=epoch, max_grad_norm=optim.grad_clip,
                    log=lambda m, global_step, p=name: tracker.log_metrics({f"{p}_{k}": v for k, v in m.items()}, step=global_step),
                    grad_sync=ddp.sync_grads if ddp else None,
                )
                side_stats = ddp.reduce_stats(side_stats) if ddp else side_stats
                side_metrics.update({f"train_{name}_{k}": float(v) for k, v in side_stats.items()
                                     if k.endswith("loss") and not k.startswith("first_")})
                side_metrics[f"train_{name}_seconds"] = side_stats["seconds"]
            if side_optimizers:
                step.set_pass("net")
            stats = train_one_epoch(
                step, batches, optimizer, dev, scheduler=scheduler, amp_dtype=amp, progress=progress, epoch=epoch,
                log=lambda m, global_step: tracker.log_metrics(m, step=global_step), max_grad_norm=optim.grad_clip,
                grad_sync=ddp.sync_grads if ddp else None,
            )
            if ddp is not None:
                stats = ddp.reduce_stats(stats)
                ddp.broadcast_module(step, buffers_only=True)  # rank 0's BatchNorm statistics on every rank
            metrics = {
                f"train_{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not k.startswith("first_")
            }
            metrics.update(side_metrics)
            metrics["epoch_lr"] = optimizer.param_groups[0]["lr"]
            if watch:
                if start_loss is None:
                    start_loss = stats[f"first_{watch}"]
                    metrics[f"start_{watch}"] = start_loss
                collapsed = objective.collapsed(metrics["train_acc"], num_classes, start_loss, metrics[f"train_{watch}"])
                metrics["collapsed"] = float(collapsed)
            for name, loader in eval_loaders.items() if main else ():  # rank 0 scores, the others wait
                result = evaluate(model, loader, dev, num_classes)
                metrics.update(_epoch_metrics(name, result))
                if name == "test":
                    last_test = result
            if val_loader is not None and main:
                prefix = objective.validation_prefix
                metrics.update({f"{prefix}_{k}": v for k, v in evaluate_terms(step, val_loader, dev).items()})
            if ddp is not None:
                metrics = ddp.broadcast_object(metrics)  # one set of metrics (and plateau steps) on every rank
            if plateau is not None:
                plateau.step(plateau_loss(metrics, objective.plateau_metric))
                metrics["plateau_scale"] = plateau.scale
            done = epoch + 1
            if "test_video_top1" in metrics:
                best_test = max([h["test_video_top1"] for h in history] + [metrics["test_video_top1"]])
                for stage, at in stages.items():
                    if done == at:
                        metrics[f"acc_{stage}"] = metrics["test_video_top1"]
                        # The best test accuracy reached by then, as the KD paper reads its stages.
                        metrics[f"best_acc_{stage}"] = best_test
            history.append({"epoch": done, **metrics})
            if progress:
                _print_epoch(role, cfg.model.arch, done, optim.epochs, metrics)
            tracker.log_metrics(metrics, step=done)
            if main:
                _save_epoch(ckpt_path, {
                    "model": model.state_dict(),
                    "heads": _heads(step),
                    "optimizer": optimizer.state_dict(),
                    "side_optimizers": {name: side.state_dict() for name, side in side_optimizers.items()},
                    "scheduler": scheduler.state_dict(),
                    **({"plateau": plateau.state_dict()} if plateau is not None else {}),
                    "epoch": done,
                    "history": history,
                    "rng": rng_state(),
                    "run_id": run_id,
                    "classes": splits.classes,
                    "arch": cfg.model.arch,
                    "config": {k: _plain(v) for k, v in cfg.params(kd=teacher is not None).items()},
                }, history, workdir if ddp is not None else None)
            if epoch_callback is not None:
                try:
                    epoch_callback(done, metrics)
                except StopTraining as exc:
                    stopped = str(exc) or "stopped"
                    tracker.set_tags({"stopped_early": stopped})
                    break

        if last_test is None and "test" in eval_loaders and main:  # a resumed run that had already trained every epoch
            last_test = evaluate(model, eval_loaders["test"], dev, num_classes)
        if watch and history:
            collapsed = bool(history[-1].get("collapsed", 0.0))
            tracker.set_tags({"collapsed": str(collapsed).lower()})
            if collapsed and progress:
                print(f"[{role} {cfg.model.arch}] collapsed: train accuracy at chance while {watch} did not come down "
                      f"({start_loss:.3f} -> {history[-1][f'train_{watch}']:.3f})", file=sys.stderr, flush=True)
        final = {"_model_uri": None}
        if main:
            extra_final = objective.final_metrics(model, cfg, splits, dev) if objective.final_metrics else {}
            final = _finish(tracker, model, last_test, splits, history, clip, extra_final)
            for name, value in (objective.logged_state(step) if objective.logged_state else {}).items():
                tracker.log_torch(value, name)
    if ddp is not None:
        final = ddp.broadcast_object(final)
    model_uri = final.pop("_model_uri")
    # Registered once the run has ended FINISHED, so a run killed or failed before then leaves no
    # version behind (and cannot become champion).
    if register and main:
        _register(model_uri, run_id, splits, cfg, role, objective.registry_label, champion=objective.labels)
    return RunResult(run_id=run_id, final=final, history=history, stopped=stopped, model_uri=model_uri)


BEST_METRIC = "val_video_top1"  # what best.pt keeps the best of; never the test split


def _save_epoch(path: Path, state: dict[str, Any], history: list[dict[str, float]], elastic_dir: Path | str | None) -> None:
    """The epoch's checkpoint (`last.pt`), `best.pt` when the validation accuracy reached a new best
    (weights only, loadable as a --teacher or --init checkpoint; the logged model is the last
    epoch's), and for a torchrun job the record its restart resumes from."""
    save_checkpoint(path, state)
    if _new_best(history, BEST_METRIC):
        best = {k: state[k] for k in ("model", "epoch", "run_id", "classes", "arch", "config")}
        save_checkpoint(path.with_name("best.pt"), {**best, BEST_METRIC: history[-1][BEST_METRIC]})
    if elastic_dir is not None:
        distributed.record_checkpoint(elastic_dir, path)


def _new_best(history: list[dict[str, float]], metric: str) -> bool:
    """Whether the last epoch set a new maximum of `metric` (validation runs only)."""
    if not history or metric not in history[-1]:
        return False
    return history[-1][metric] > max((h.get(metric, -math.inf) for h in history[:-1]), default=-math.inf)


def plateau_loss(metrics: dict[str, float], first: str | None = None) -> float:
    """What the plateau schedule watches: the objective's own metric (`first`) when logged, else the
    validation split's loss, else the training loss; never the test split."""
    for key in (first, "val_loss", "train_loss"):
        if key in metrics:
            return metrics[key]
    raise KeyError("no loss to watch")


def default_run_name(cfg: RunConfig, role: str, teacher: Teacher | None, method: str = "") -> str:
    """A name that says what the run is, e.g. kd-c3d→r3d_18-f0.25-s0 or pcl-scratch-r3d_18-f1-s0
    (`method`: the objective's name prefix). MLflow's random names would repeat for every run of a
    seed, since they come from Python's seeded `random`."""
    arch, seed, frac = cfg.model.arch, cfg.optim.seed, f"f{cfg.data.fraction:g}"
    if role == "teacher":
        return f"teacher-{method}{arch}-s{seed}"
    if role == "pretrain":
        return f"pretrain-{method}{arch}-{frac}-s{seed}"
    if role == "student":
        prefix = f"kd-{teacher.arch or 'teacher'}→{arch}" if teacher is not None else f"scratch-{arch}"
        return f"{method}{prefix}-{frac}-s{seed}"
    return f"{role}-{arch}-{cfg.data.dataset}-{frac}-s{seed}"


def describe_run(cfg: RunConfig, role: str, teacher: Teacher | None, splits: Splits, method: str = "") -> str:
    """One paragraph saying what the run is, shown as its description in the MLflow UI (`method`:
    the objective's own sentence)."""
    o, c, kd = cfg.optim, cfg.clip, cfg.kd
    what = {"teacher": "Teacher", "student": "Student", "finetune": "Fine-tune",
            "pretrain": "Label-free pretraining of"}.get(role, role.capitalize())
    text = (
        f"{what} {cfg.model.arch} (width {cfg.model.width}{', residual frames' if cfg.model.modality == 'res' else ''}) on {cfg.data.dataset} ({cfg.data.root}), "
        f"{cfg.data.fraction:g} of the training videos ({len(splits.train.samples)}), seed {o.seed}: "
        f"{o.epochs} epochs, lr {o.lr:g}, batch {o.batch_size}, {c.clip_len}-frame {c.crop}x{c.crop} clips."
    )
    text += method
    if teacher is not None:
        weight = f"alpha {kd.alpha:g}" if kd.weighting == "mix" else f"lambda {kd.lam:g}"
        text += (f" Distilled from {teacher.arch or 'a'} teacher {teacher.uri} (run {teacher.run_id}) with logit KD, "
                 f"tau {kd.tau:g}, {kd.weighting} weighting, {weight}.")
    elif role == "student":
        text += " No teacher: the scratch twin of the distilled runs with the same pair_key."
    return text


CHAMPION_METRIC = "val_video_top1"


def registered_name(role: str, label: str, arch: str) -> str:
    """Registry name of a run's model: one per (method, architecture), so `@champion` compares like
    with like: kdhar-teacher-c3d, kdhar-scratch-r3d_18, kdhar-kd-r3d_18, kdhar-pcl-kd-r3d_18,
    kdhar-pretrain-c3d, kdhar-finetune-c3d, kdhar-teacher-<label>-c3d (a teacher of another method). `label`: the objective's `registry_label`."""
    if role == "student":
        return f"kdhar-{label}-{arch}"
    if role == "teacher" and label != "scratch":  # a teacher trained with a method's own parts
        return f"kdhar-teacher-{label}-{arch}"
    return f"kdhar-{role}-{arch}"


def _finish(tracker, model, result, splits, history, clip, extra: dict[str, float]) -> dict:
    """Final test metrics (`result`: the last evaluation, None for a run without a classifier to
    score), `extra` final metrics, plots, reports and the logged model."""
    final = _epoch_metrics("final_test", result) if result is not None else {}
    final.update(extra)
    best_val = max((h.get("val_video_top1", float("nan")) for h in history), default=float("nan"))
    if not math.isnan(best_val):
        final["best_val_video_top1"] = best_val
    tracker.log_metrics(final, step=len(history))
    if result is not None:
        tracker.log_figure(confusion_figure(result["confusion"], splits.classes), "confusion_matrix.png")
        tracker.log_dict({"per_class": result["per_class"], "classes": splits.classes}, "per_class_report.json")
    tracker.log_figure(curves_figure(history), "learning_curves.png")
    model.eval().cpu()
    example = np.zeros((2, 3, clip.clip_len, clip.crop, clip.crop), dtype=np.float32)
    info = tracker.log_model(model, tracking.model_name(tracker.run_name or "model"), input_example=example)
    final["_model_uri"] = info.model_uri
    return final


def _register(model_uri: str, run_id: str, splits: Splits, cfg: RunConfig, role: str, label: str,
              champion: bool = True) -> None:
    """Registers a FINISHED run's model as a new version and lets it compete for `@champion`: on
    the validation split only (the last epoch's, as the logged weights are the last epoch's); a run
    without one, or without a classifier to score (`champion` False), registers a version but
    never becomes champion."""
    name = registered_name(role, label, cfg.model.arch)
    version = tracking.register_model(model_uri, name, run_id)
    if champion and splits.val is not None:
        tracking.promote_champion(name, version, CHAMPION_METRIC, splits.fingerprint)


@dataclass
class TrainingView:
    """What a run trains on (its objective's view of the training videos) and the fixed set its
    step validates on each epoch, if the objective has one."""

    train: Any
    validation: Any = None
    too_short: int = 0  # training videos the view left out

    @classmethod
    def build(cls, objective: Objective, cfg: RunConfig, splits: Splits) -> TrainingView:
        """Raises ValueError when no training video can give the view a sample."""
        seed = cfg.optim.seed
        if objective.make_data is None:
            return cls(VideoClipDataset(splits.train, cfg.clip, train=True, seed=seed, on_bad=cfg.data.on_bad,
                                        num_views=cfg.data.views or None, cache_bytes=TRAIN_FRAME_CACHE_BYTES))
        train = objective.make_data(splits.train, seed, TRAIN_FRAME_CACHE_BYTES)
        validation = objective.make_validation(splits.test, seed) if objective.make_validation else None
        return cls(train, validation, getattr(train, "too_short", 0))


def _heads(step: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A step's own saved weights beyond the model's (a method's heads), for a resume."""
    model = getattr(step, "model", None)
    prefix = next((f"{name}." for name, child in step.named_children() if child is model), None)
    return {k: v for k, v in step.state_dict().items() if prefix is None or not k.startswith(prefix)}


class _WithExtras:
    """Wraps a loader, adding what the objective needs per batch (e.g. cached teacher logits)."""

    def __init__(self, loader, extras: Callable[[dict[str, Any]], dict[str, torch.Tensor]]):
        self.loader, self.extras = loader, extras

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            batch.update(self.extras(batch))
            yield batch


def _print_epoch(role: str, arch: str, epoch: int, epochs: int, m: dict[str, float]) -> None:
    shown = [f"loss {m['train_loss']:.3f}", f"train acc {m.get('train_acc', float('nan')):.3f}"]
    for key in sorted(k for k in m if k.startswith("train_") and k.endswith("_acc") and k != "train_acc"):
        name = key.removeprefix("train_").removesuffix("_acc")  # a method's own accuracy, e.g. pretext
        val = next((v for k, v in m.items() if k.endswith(f"val_{name}_acc")), float("nan"))
        shown.append(f"{name} acc {m[key]:.3f} (val {val:.3f})")
    shown += [f"{k.split('_')[0]} {m[k]:.3f}" for k in ("val_video_top1", "test_video_top1") if k in m]
    shown.append(f"{m['train_clips_per_s']:.0f} clips/s, {m['train_seconds']:.0f}s")
    print(f"[{role} {arch}] epoch {epoch}/{epochs}: " + ", ".join(shown), file=sys.stderr, flush=True)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_compatible(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Loads matching weights; tensors whose shape differs (a new classifier) are skipped and returned."""
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped
