"""What a run is: its configuration hash, name, description, tags and registry name, and the
tracker it is recorded in."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import TYPE_CHECKING, Any

import torch

from kdhar import distributed, tracking
from kdhar.config import RunConfig
from kdhar.objectives import Teacher
from kdhar.training.splits import Splits

if TYPE_CHECKING:
    from kdhar.training.prepare import Prepared

# Knobs added after runs were already being identified by their hash: at these values they behave
# as before the knob existed, so they are left out of the hash and earlier runs keep their identity.
# The plateau threshold and patience act only under the plateau schedule: runs on another schedule keep their identity.
HASH_NEUTRAL = {"model.modality": "rgb", "optim.sync_bn": False, "clip.normalize": "half",
                "optim.plateau_threshold": 1e-4, "optim.plateau_patience": 50, "model.keep_time": 0}


def config_hash(cfg: RunConfig, teacher: str | None, init: str | None) -> str:
    """Identifies a run's configuration, so a grid can skip cells that already finished.

    The KD knobs count only for runs with a teacher: changing them retrains no teacher or scratch run.
    """
    params = {k: v for k, v in cfg.params(kd=teacher is not None).items() if HASH_NEUTRAL.get(k, object()) != v}
    payload = json.dumps({**params, "teacher": teacher, "init": init}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_run_name(cfg: RunConfig, role: str, teacher: Teacher | None, method: str = "") -> str:
    """A name that says what the run is, e.g. kd-c3d→r3d_18-f0.25-s0 or pcl-scratch-r3d_18-f1-s0
    (`method`: the objective's name prefix). MLflow's random names would repeat for every run of a
    seed, since they come from Python's seeded `random`."""
    arch, seed, frac = cfg.model.arch, cfg.optim.seed, f"f{cfg.data.fraction:g}"
    if method.startswith("det-"):
        return _detection_run_name(role, arch, seed, frac, teacher, method)
    if role == "teacher":
        return f"teacher-{method}{arch}-s{seed}"
    if role == "pretrain":
        return f"pretrain-{method}{arch}-{frac}-s{seed}"
    if role == "student":
        prefix = f"kd-{teacher.arch or 'teacher'}→{arch}" if teacher is not None else f"scratch-{arch}"
        return f"{method}{prefix}-{frac}-s{seed}"
    return f"{role}-{arch}-{cfg.data.dataset}-{frac}-s{seed}"


def _detection_run_name(role: str, arch: str, seed: int, frac: str, teacher: Teacher | None, method: str) -> str:
    """det-teacher-c3d-s0, det-teacher-att-c3d-s0, det-scratch-tiny3d-f1-s0, det-att-scratch-tiny3d-f1-s0,
    det-kd-c3d→tiny3d-f1-s0, det-gkd-c3d→tiny3d-f1-s0 (`method`: "det-", "det-att-", "det-kd-" or "det-gkd-")."""
    kind = method.removeprefix("det-")  # "", "att-", "kd-", "gkd-"
    if role == "teacher":
        return f"det-teacher-{kind}{arch}-s{seed}"
    if role == "student" and teacher is not None:
        return f"det-{kind}{teacher.arch or 'teacher'}→{arch}-{frac}-s{seed}"
    if role == "student":
        return f"det-{kind}scratch-{arch}-{frac}-s{seed}"
    return f"det-{role}-{arch}-{frac}-s{seed}"


def describe_run(cfg: RunConfig, role: str, teacher: Teacher | None, splits: Splits, method: str = "") -> str:
    """One paragraph saying what the run is, shown as its description in the MLflow UI (`method`:
    the objective's own sentence)."""
    o, c, kd = cfg.optim, cfg.clip, cfg.kd
    what = {"teacher": "Teacher", "student": "Student", "finetune": "Fine-tune",
            "pretrain": "Label-free pretraining of"}.get(role, role.capitalize())
    inputs = (f"{c.clip_len}-frame {c.crop}x{c.crop} clips" if cfg.task != "detection"
              else f"{cfg.window.length}-step {c.crop}x{c.crop} windows")
    text = (
        f"{what} {cfg.model.arch} (width {cfg.model.width}{', residual frames' if cfg.model.modality == 'res' else ''}) on {cfg.data.dataset} ({cfg.data.root}), "
        f"{cfg.data.fraction:g} of the training videos ({len(splits.train.samples)}), seed {o.seed}: "
        f"{o.epochs} epochs, lr {o.lr:g}, batch {o.batch_size}, {inputs}."
    )
    text += method
    if teacher is not None and cfg.task == "detection":
        text += f" Teacher: {teacher.arch or 'a'} detector {teacher.uri} (run {teacher.run_id})."
    elif teacher is not None:
        weight = f"lambda {kd.lam:g}" if kd.weighting == "sum" else f"alpha {kd.alpha:g}"
        text += (f" Distilled from {teacher.arch or 'a'} teacher {teacher.uri} (run {teacher.run_id}) with logit KD, "
                 f"tau {kd.tau:g}, {kd.weighting} weighting, {weight}.")
    elif role == "student":
        text += " No teacher: the scratch twin of the distilled runs with the same pair_key."
    return text


def registered_name(role: str, label: str, arch: str) -> str:
    """Registry name of a run's model: one per (method, architecture), so `@champion` compares like
    with like: kdhar-teacher-c3d, kdhar-scratch-r3d_18, kdhar-kd-r3d_18, kdhar-pcl-kd-r3d_18,
    kdhar-pretrain-c3d, kdhar-finetune-c3d, kdhar-teacher-<label>-c3d (a teacher of another method). `label`: the objective's `registry_label`."""
    if label.startswith("det-"):  # temporal detectors: kdhar-det-teacher-c3d, kdhar-det-gkd-tiny3d, ...
        return "kdhar-det-" + registered_name(role, label.removeprefix("det-"), arch).removeprefix("kdhar-")
    if role == "student":
        return f"kdhar-{label}-{arch}"
    if role == "teacher" and label != "scratch":  # a teacher trained with a method's own parts
        return f"kdhar-teacher-{label}-{arch}"
    return f"kdhar-{role}-{arch}"


def run_tags(prep: Prepared, tags: dict[str, str] | None) -> dict[str, str]:
    """The run's tags: what it trains, on which data, where and how (`tags`: the caller's own)."""
    cfg, ddp, teacher, splits = prep.cfg, prep.ddp, prep.objective.teacher, prep.splits
    found = {
        "role": prep.role,
        "arch": cfg.model.arch,
        "dataset": cfg.data.dataset,
        "dataset_fingerprint": splits.fingerprint,
        "config_hash": config_hash(cfg, teacher.uri if teacher else None, None),
        "fraction": str(cfg.data.fraction),
        "seed": str(cfg.optim.seed),
        "teacher_arch": (teacher.arch or "unknown") if teacher else "none",
        "views": str(cfg.data.views),
        "torch_version": torch.__version__,
        "threads": str(cfg.optim.threads),
        # MLflow never changes a logged param: the epochs a resume extended the run to are read here.
        "epochs": str(cfg.optim.epochs),
        "modality": cfg.model.modality,
        **({"world_size": str(ddp.world)} if ddp else {}),
        **({"elastic_restarts": str(ddp.restarts)} if ddp and ddp.restarts else {}),
        # Which process trains the run, so a grid rerun can tell a run whose process died (SIGKILL,
        # out of memory) from one still training, and resume it.
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        **prep.objective.tags,
        **({"init": prep.init} if prep.init else {}),
        **(tags or {}),
    }
    if prep.changed:
        found["resumed_with_changes"] = ", ".join(f"{k} {was} -> {now}" for k, (was, now) in sorted(prep.changed.items()))
    found["mlflow.note.content"] = describe_run(cfg, prep.role, teacher, splits, prep.objective.description)
    git = tracking.git_commit()
    if git:
        found["git_commit"] = git
    return found


def open_tracker(prep: Prepared, experiment: str, run_name: str | None, parent_run_id: str | None,
                 tags: dict[str, str] | None) -> Any:
    """The run's tracker, not yet entered: a new MLflow run, or the resumed one re-opened; ranks
    other than 0 get a tracker that records nothing."""
    name = run_name or ("init-" if prep.init else "") + default_run_name(prep.cfg, prep.role, prep.objective.teacher,
                                                                         prep.objective.name_prefix)
    if not prep.main:
        return distributed.NullTracker(prep.run_id, name)
    return tracking.RunTracker(experiment, run_name=name, tags=run_tags(prep, tags), resume_run_id=prep.run_id,
                               parent_run_id=parent_run_id)

