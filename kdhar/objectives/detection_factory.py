"""The objectives of temporal detection runs (`RunConfig.task` "detection"), built as
`objectives.factory.build_objective` builds the recognition ones:

| teacher | attention | objective | step |
|---|---|---|---|
| none | off | `det-supervised` (a teacher, or the scratch student) | `detection.DetectionStep` |
| none | on | `det-attention` (GKD's teacher phase, or scratch + attention) | `detection_gkd.DetectionGKDStep` |
| a detector | off, `--kd logit` | `det-kd-logit` (per-step score distillation) | `detection_kd.DetectionKDStep` |
| a GKD detector | on, `--kd gkd` | `det-gkd` | `detection_gkd.DetectionGKDStep` |

Every one trains a `TemporalDetector` on windows (`WindowDataset`), with the detection optimiser
(`det.optimizer`), scored by `DetectionEvaluation`, and logs beside its model the state a teacher
needs (`DETECTOR_STATE`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdhar.config import RunConfig
from kdhar.data.window_dataset import WindowDataset, collate_windows
from kdhar.detector_eval import DetectionEvaluation
from kdhar.models.detector import build_detector
from kdhar.models.teacher import Teacher
from kdhar.objectives.detection import DetectionStep
from kdhar.objectives.detection_gkd import DetectionGKDStep, attach_attention, detector_state, load_detector_state
from kdhar.objectives.detection_kd import DetectionKDStep
from kdhar.objectives.objective import Objective, teacher_tags

# Where a detection run keeps what its exported graph cannot give a student: how to rebuild the
# detector, its weights and, with attention, its CVAEs.
DETECTOR_STATE = "detector/state.pt"
NAME_PREFIXES = {"det-supervised": "det-", "det-attention": "det-att-", "det-kd-logit": "det-kd-", "det-gkd": "det-gkd-"}


def detection_method(cfg: RunConfig, teacher: Teacher | None) -> str:
    """The objective's name (the run's `method` tag) for this configuration and teacher.

    Raises:
        ValueError: score distillation asked of a detector with the attention module.
    """
    if teacher is None:
        return "det-attention" if cfg.gkd.attention else "det-supervised"
    if cfg.gkd.method == "gkd":
        return "det-gkd"
    if cfg.gkd.attention:
        raise ValueError("score distillation (--kd logit) trains a plain detector: leave --attention out, or "
                         "distil with --kd gkd")
    return "det-kd-logit"


def load_detection_teacher(teacher: Teacher, attention: bool) -> tuple[nn.Module, nn.Module | None]:
    """The teacher's detector and, for GKD, its CVAEs, from the state its run logged.

    Raises:
        ValueError: the teacher is no detection run, or has no attention module when GKD needs one.
    """
    from kdhar import tracking

    state = tracking.load_run_torch(teacher.run_id, DETECTOR_STATE) if teacher.run_id else None
    if state is None:
        raise ValueError(f"teacher {teacher.uri} is not a detector trained by kdhar (no {DETECTOR_STATE}): "
                         "train one with `kdhar detect train-teacher`")
    model, cvaes = load_detector_state(state)
    if attention and cvaes is None:
        raise ValueError(f"teacher {teacher.uri} has no GKD attention module and CVAEs: train one with `kdhar detect "
                         f"train-teacher --arch {state['arch']} --attention true`")
    return model, cvaes


def detection_objective(cfg: RunConfig, teacher: Teacher | None) -> Objective:
    """The detection objective of a run (see the module's table)."""
    g, det, window, clip = cfg.gkd, cfg.det, cfg.window, cfg.clip
    name = detection_method(cfg, teacher)
    parts = load_detection_teacher(teacher, name == "det-gkd") if teacher is not None else (None, None)
    built: dict[str, Any] = {}
    params = _method_params(cfg, name)

    def make_model(num_classes: int) -> nn.Module:
        model = build_detector(cfg.model.arch, num_classes, width=cfg.model.width, head_channels=det.head_channels,
                               modality=cfg.model.modality)
        built["cvaes"] = attach_attention(model, window.length, clip.crop, g.variant, g.norm) if g.attention else None
        built["meta"] = {"arch": cfg.model.arch, "num_classes": num_classes, "width": cfg.model.width,
                         "head_channels": det.head_channels, "modality": cfg.model.modality, "length": window.length,
                         "crop": clip.crop, "variant": g.variant, "norm": g.norm}
        return model

    def make_step(model: nn.Module, num_train: int) -> nn.Module:
        if name == "det-supervised":
            return DetectionStep(model, det.reg_weight)
        if name == "det-kd-logit":
            return DetectionKDStep(model, parts[0], tau=cfg.kd.tau, lam=cfg.kd.lam, reg_weight=det.reg_weight)
        step = DetectionGKDStep(model, built["cvaes"], g, det.reg_weight, det.bg_weight, cfg.optim.epochs,
                                (window.length, clip.crop), *parts, steps_per_epoch=num_train // cfg.optim.batch_size)
        if step.adapters is not None:  # what aligns each student tap with the teacher's, for the params
            params["gkd.adapter"] = "; ".join(a.describe() for a in step.adapters)
        return step

    def make_data(index: Any, seed: int, cache_bytes: int = 0) -> WindowDataset:
        data = WindowDataset(index, clip, window, train=True, seed=seed)
        if len(data) == 0:
            raise ValueError(f"no training window of {window.length} steps holds a segment in {index.root}: lower "
                             "--min-inside or --window-length")
        return data

    def logged_state(step: nn.Module) -> dict[str, Any]:
        return {DETECTOR_STATE: detector_state(step.model, built["cvaes"], built["meta"])}

    tags = teacher_tags(name, teacher) if teacher is not None else {"method": name}
    tags["task"] = "detection"
    return Objective(
        name=name, make_step=make_step, params=params, tags=tags, teacher=teacher, view="window", make_data=make_data,
        name_prefix=NAME_PREFIXES[name], description=_description(cfg, name), logged_state=logged_state,
        make_model=make_model, evaluation=DetectionEvaluation(clip, window, det), collate=collate_windows,
        optimizer=det.optimizer,
    )


def _method_params(cfg: RunConfig, name: str) -> dict[str, Any]:
    """The distillation knobs a run with a teacher logs (runs without one log none of them)."""
    g = cfg.gkd
    if name == "det-kd-logit":
        return {"kd.tau": cfg.kd.tau, "kd.lam": cfg.kd.lam}
    if name == "det-gkd":
        return {"gkd.method": g.method, "gkd.beta": g.beta, "gkd.gd_weight": g.gd_weight}
    return {}


def _description(cfg: RunConfig, name: str) -> str:
    w, g, det = cfg.window, cfg.gkd, cfg.det
    text = (f" Temporal detection on {w.length}-step windows ({w.frame_interval} frames a step; every "
            f"{w.train_stride} frames for training, {w.test_stride} for testing), anchor-free 1-D head on two taps, "
            f"{det.optimizer}, {det.nms} NMS.")
    if g.attention:
        text += (f" With GKD's attention module and a CVAE on each tap (two passes per epoch), background branch x"
                 f"{det.bg_weight:g}, regeneration ramped over {g.ramp:g} of the epochs")
        text += f"; distilled with GKD (beta {g.beta:g}, GD {g.gd_weight:g})." if name == "det-gkd" else ", no teacher."
    elif name == "det-kd-logit":
        text += f" Distilled from the teacher's per-step class scores (tau {cfg.kd.tau:g}, lambda {cfg.kd.lam:g})."
    return text
