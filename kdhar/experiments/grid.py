"""What an experiment grid is made of: the spec's data (`GridSpec`, `DatasetSpec`), the keys a spec
may use, and `SpecError`, which every check of a spec raises.

Plain data only: reading a spec is `spec`, turning it into cells is `plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdhar import config as C

SIZES = ("cpu", "paper")

# Spec key -> (RunConfig section, field). Only these knobs may be overridden from a spec, so a typo
# is an error rather than a silently ignored setting.
OVERRIDES: dict[str, tuple[str, str]] = {
    "epochs": ("optim", "epochs"),
    "lr": ("optim", "lr"),
    "batch_size": ("optim", "batch_size"),
    "schedule": ("optim", "schedule"),
    "momentum": ("optim", "momentum"),
    "weight_decay": ("optim", "weight_decay"),
    "width": ("model", "width"),
    "dropout": ("model", "dropout"),
    "modality": ("model", "modality"),
    "clip_len": ("clip", "clip_len"),
    "frame_interval": ("clip", "frame_interval"),
    "crop": ("clip", "crop"),
    "resize": ("clip", "resize"),
    "test_clips": ("clip", "test_clips"),
    "augment": ("clip", "augment"),
    "hflip": ("clip", "hflip"),
    "num_workers": ("data", "num_workers"),
    "val_fraction": ("data", "val_fraction"),
    "views": ("data", "views"),
    "warmup": ("optim", "warmup"),
    "grad_clip": ("optim", "grad_clip"),
    "threads": ("optim", "threads"),
    "sync_bn": ("optim", "sync_bn"),
    # PCL (`ssl: pcl`): the tuple view and the self-supervised terms
    "ssl": ("pcl", "ssl"),
    "pcl_interval": ("pcl", "interval"),
    "clip_stride": ("pcl", "clip_stride"),
    "spatial_perm": ("pcl", "spatial_perm"),
    "swap_pairs": ("pcl", "swap_pairs"),
    "contrast": ("pcl", "contrast"),
    "contrast_weight": ("pcl", "contrast_weight"),
    "negatives": ("pcl", "negatives"),
    "nce_temperature": ("pcl", "temperature"),
    "bank_momentum": ("pcl", "momentum"),
    # GKD (`kd: gkd`): the attention module, its CVAE and the distillation terms
    "kd": ("gkd", "method"),
    "attention": ("gkd", "attention"),
    "gkd_variant": ("gkd", "variant"),
    "gkd_beta": ("gkd", "beta"),
    "gkd_ramp": ("gkd", "ramp"),
    "gkd_rec_weight": ("gkd", "rec_weight"),
    "gkd_gd_weight": ("gkd", "gd_weight"),
    "cvae_lr": ("gkd", "cvae_lr"),
    "gkd_ce": ("gkd", "ce"),
    "gkd_rescale": ("gkd", "rescale"),
    "gkd_norm": ("gkd", "norm"),
    # Temporal detection (`task: detection`): windows, the head and decoding. There, frame_interval
    # is the window's frames per step (`DETECTION_KEYS`).
    "window_length": ("window", "length"),
    "train_stride": ("window", "train_stride"),
    "test_stride": ("window", "test_stride"),
    "min_inside": ("window", "min_inside"),
    "train_empty": ("window", "train_empty"),
    "head_channels": ("det", "head_channels"),
    "reg_weight": ("det", "reg_weight"),
    "det_optimizer": ("det", "optimizer"),
    "nms": ("det", "nms"),
    "nms_sigma": ("det", "sigma"),
    "nms_iou": ("det", "iou_threshold"),
    "score_threshold": ("det", "score_threshold"),
    "top_k": ("det", "top_k"),
    "bg_weight": ("det", "bg_weight"),
}
# Where a key lands in a detection run when it differs from OVERRIDES.
DETECTION_KEYS: dict[str, tuple[str, str]] = {"frame_interval": ("window", "frame_interval")}
TASKS = C.TASKS

# What teacher_overrides and student_overrides may set. A distilled student feeds its own clips to the
# teacher, so teachers and students may differ in size and schedule but not in how clips are cut.
MODEL_OVERRIDES = {
    "epochs", "lr", "batch_size", "schedule", "momentum", "weight_decay", "width", "dropout", "warmup", "grad_clip",
    "modality", "head_channels", "reg_weight", "det_optimizer",
}

SPEC_KEYS = {
    "experiment", "dataset", "transfer", "size", "overrides", "teacher_overrides", "transfer_overrides",
    "teachers", "students", "self_distill", "fractions", "seeds", "teacher_seed", "tau", "lam",
    "weighting", "alpha", "finetune", "cache_teacher", "tuned", "student_overrides", "ssl",
    "fraction_overrides", "keep_checkpoints", "kd", "task",
}
DATASET_KEYS = {"name", "root", "split", "fraction", "split_dir"}


class SpecError(ValueError):
    """An experiment spec that cannot be run; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives. `fraction` only matters for the transfer dataset."""

    name: str
    root: str
    split: int = 1
    fraction: float = 1.0
    split_dir: str = ""


@dataclass(frozen=True)
class GridSpec:
    """A whole study: every field is plain data read from YAML."""

    experiment: str
    dataset: DatasetSpec
    teachers: list[str]
    students: list[str]
    fractions: list[float]
    seeds: list[int]
    size: str = "cpu"
    overrides: dict[str, Any] = field(default_factory=dict)
    teacher_overrides: dict[str, Any] = field(default_factory=dict)
    transfer_overrides: dict[str, Any] = field(default_factory=dict)
    # Per student architecture, on top of `overrides` (e.g. more epochs for the slower ResNets); its
    # scratch and distilled runs and their fine-tunes alike.
    student_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per training fraction, on top of those (e.g. a smaller batch where 2 % of the videos would
    # give one step an epoch); scratch and distilled students alike.
    fraction_overrides: dict[float, dict[str, Any]] = field(default_factory=dict)
    transfer: DatasetSpec | None = None
    self_distill: bool = False  # also distil an architecture into itself
    teacher_seed: int = 0  # teachers are trained once, on all training videos
    tau: float = C.KDConfig.tau
    lam: float = C.KDConfig.lam
    weighting: str = C.KDConfig.weighting
    alpha: float = C.KDConfig.alpha
    finetune: bool = False
    cache_teacher: bool = False
    tuned: str | None = None  # an Optuna study whose best KD settings (and lr) the KD cells use
    # "pcl": students (scratch and distilled) train inside PCL; teachers and fine-tunes stay supervised.
    ssl: str = "none"
    # A finished cell's model is in the tracking store; its checkpoint (optimizer state and all) is
    # deleted unless this is set (the paper's grid would otherwise leave ~18 GB behind).
    keep_checkpoints: bool = False
    kd_overrides: dict[str, Any] = field(default_factory=dict)  # filled from `tuned` (lr; GKD's beta and ramp)
    # The distillation methods of the KD cells (`--kd`): with gkd or gkd+logit the teachers train with
    # GKD's attention module (all methods distil from them) and each scratch cell gets a twin with the
    # attention module and no teacher ("scratch + attention").
    kd_methods: list[str] = field(default_factory=lambda: ["logit"])
    # "recognition" (clips) or "detection" (windows of untrimmed videos, `kdhar detect`'s runs): with
    # detection every cell trains a temporal detector, the teachers with GKD's attention module when
    # a KD method is gkd, and "logit" is the per-step score distillation.
    task: str = "recognition"

    @property
    def kd(self) -> C.KDConfig:
        """The distillation settings of the KD cells."""
        return C.KDConfig(tau=self.tau, weighting=self.weighting, alpha=self.alpha, lam=self.lam)
