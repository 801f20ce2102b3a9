"""What a training method is, once built (`Objective`), and the loss terms each method logs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdhar.methods import REGISTRY_LABELS
from kdhar.models.teacher import Teacher


@dataclass
class Objective:
    """A training method, built: everything `run_training` needs to know about it.

    Attributes:
        name: "supervised", "kd-logit", "pcl" (PCL with action CE), "pcl+kd-logit" or "pcl-ssl"
            (label-free PCL); the run's `method` tag.
        make_step: `make_step(model, num_train)` wraps the network being trained into a step module
            whose forward(x, y, **extra) returns {"loss", "output", ...named "*_loss" terms}, and
            optionally "target" (what "output" is scored against, default the labels) and
            "*_correct" counts (reported as "*_acc"); `num_train` is the training view's length.
        view: "clip" (single clips, `VideoClipDataset`), "tuple" (PCL) or "window" (windows of untrimmed
            videos, detection); `make_data` builds the last two.
        make_data: `make_data(index, seed, cache_bytes)`, the training dataset of a non-clip view;
            it may have `too_short` (videos left out).
        make_validation: `make_validation(index, seed)`, a fixed set that `step.validate` scores
            each epoch (logged as `<validation_prefix>_*`), or None.
        plateau_metric: the epoch metric the plateau schedule watches first (else the validation
            split's loss, else the training loss).
        selection_metric: the epoch metric, lowest best, that picks the run's best epoch (`best.pt`,
            the `sel_acc_*` stages) in place of the validation split's accuracy, or None.
        final_metrics: `final_metrics(model, cfg, splits, device)`, metrics of the trained model
            logged at the end (PCL: clip retrieval), or None.
        name_prefix, description: what run names and the run's description add for the method.
        labels: whether the run learns the action labels (False: label-free pretraining, which
            has no classifier to score).
        logged_state: `logged_state(step)`, {artifact path: object} logged with the model (GKD:
            the network and CVAE weights a teacher needs), or None.
        make_model: `make_model(num_classes)`, the network to train when it is not the registry's
            classifier for `cfg.model` (a temporal detector), or None.
        evaluation: how the model is scored (`kdhar.training.scoring`), when not by clip accuracy
            (detection: `kdhar.detector_eval.DetectionEvaluation`), or None.
        collate: how training items become a batch, when not clips (windows: `collate_windows`).
        optimizer: the "net" pass's optimiser, "sgd" (the recognition papers') or "adam".
        params: the method's knobs, logged as MLflow params (only those that act in this run).
        tags: what the run is (method, teacher run, cache key).
        teacher: the frozen teacher, if any (its classes are checked against the dataset).
        batch_extras: adds what a batch needs beyond the clip (cached teacher logits), or None.
        soft_term: the soft loss to a teacher's logits ("kd_loss") whose uniform-student level the step
            also reports (`kdhar.objectives.stuck.uniform_term`), or None; with it the stuck-run
            check (`is_stuck`) judges a distilled run before half its epochs are done.
    """

    name: str
    make_step: Callable[[nn.Module, int], nn.Module]
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    teacher: Teacher | None = None
    batch_extras: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None
    soft_term: str | None = None
    view: str = "clip"
    make_data: Callable[..., Any] | None = None
    make_validation: Callable[..., Any] | None = None
    validation_prefix: str = "ssl_val"
    plateau_metric: str | None = None
    selection_metric: str | None = None
    final_metrics: Callable[..., dict[str, float]] | None = None
    name_prefix: str = ""
    description: str = ""
    labels: bool = True
    logged_state: Callable[[nn.Module], dict[str, Any]] | None = None
    make_model: Callable[[int], nn.Module] | None = None
    evaluation: Any = None
    collate: Callable[[list], dict[str, Any]] | None = None
    optimizer: str = "sgd"

    @property
    def registry_label(self) -> str:
        return REGISTRY_LABELS[self.name]

    @property
    def terms(self) -> tuple[str, ...]:
        """The loss terms this method logs (train_<term>), for reports and the tuner."""
        return METHOD_TERMS[self.name]


METHOD_TERMS = {
    "supervised": ("task_loss",),
    "kd-logit": ("task_loss", "kd_loss"),
    "pcl": ("pretext_loss", "nce0_loss", "nce2_loss", "ntxent_loss", "task_loss"),
    "pcl+kd-logit": ("pretext_loss", "nce0_loss", "nce2_loss", "ntxent_loss", "task_loss", "kd_loss"),
    "pcl-ssl": ("pretext_loss", "nce0_loss", "nce2_loss", "ntxent_loss"),
    # GKD: the net pass's terms, then the CVAE pass's (logged with a cvae_ prefix)
    "attention": ("task_loss", "rec_loss", "cvae_recon_loss", "cvae_kl_loss"),
    "gkd": ("task_loss", "rec_loss", "ad_loss", "align_loss", "cvae_recon_loss", "cvae_kl_loss", "cvae_gd_loss"),
    "gkd+kd-logit": ("task_loss", "kd_loss", "rec_loss", "ad_loss", "align_loss", "cvae_recon_loss", "cvae_kl_loss",
                     "cvae_gd_loss"),
    "kd-feature": ("task_loss", "hint_loss"),
    # temporal detection: focal and GIoU; GKD's background branch, regeneration and distillation
    "det-supervised": ("cls_loss", "reg_loss"),
    "det-kd-logit": ("cls_loss", "reg_loss", "kd_loss"),
    "det-attention": ("cls_loss", "reg_loss", "bg_loss", "rec_loss", "cvae_recon_loss", "cvae_kl_loss"),
    "det-gkd": ("cls_loss", "reg_loss", "bg_loss", "rec_loss", "ad_loss", "align_loss", "cvae_recon_loss",
                "cvae_kl_loss", "cvae_gd_loss"),
}


def teacher_tags(method: str, teacher: Teacher) -> dict[str, str]:
    """The tags of a run distilled from `teacher`: its method and where the teacher came from."""
    return {"method": method, "teacher_run_id": teacher.run_id or "", "teacher_uri": teacher.uri}
