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
    "keep_time": ("model", "keep_time"),
    "clip_len": ("clip", "clip_len"),
    "frame_interval": ("clip", "frame_interval"),
    "crop": ("clip", "crop"),
    "resize": ("clip", "resize"),
    "test_clips": ("clip", "test_clips"),
    "augment": ("clip", "augment"),
    "hflip": ("clip", "hflip"),
    "normalize": ("clip", "normalize"),
    "num_workers": ("data", "num_workers"),
    "val_fraction": ("data", "val_fraction"),
    "views": ("data", "views"),
    "warmup": ("optim", "warmup"),
    "grad_clip": ("optim", "grad_clip"),
    "threads": ("optim", "threads"),
    "sync_bn": ("optim", "sync_bn"),
    "plateau_threshold": ("optim", "plateau_threshold"),
    "plateau_patience": ("optim", "plateau_patience"),
    # Fine-tunes (`transfer_overrides`): plain, or PCL's code's protocol (`C.PCL_FINETUNE_PRESET`)
    "finetune_protocol": ("finetune", "protocol"),
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
    "fp32_logits": ("pcl", "fp32_logits"),
    "retrieval_pool": ("pcl", "retrieval_pool"),
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
    "gkd_ablation": ("gkd", "ablation"),
    # Feature KD (`kd: feature`): the hint loss's weight
    "feature_weight": ("feature", "weight"),
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

# A grid's `kd` methods: the `--kd` choices, and GKD with one of its ablations ("gkd-ad-only": `--kd gkd
# --gkd-ablation ad-only`), each a row of its own.
GRID_METHODS = (*C.KD_METHODS, *(f"gkd-{a}" for a in C.GKD_ABLATIONS if a != "none"))


def method_overrides(method: str) -> dict[str, Any]:
    """The overrides a grid method gives its distilled cells (none for logit KD, the default)."""
    if method == "logit":
        return {}
    kd, _, ablation = method.partition("-") if method.startswith("gkd-") else (method, "", "")
    return {"kd": kd, **({"gkd_ablation": ablation} if ablation else {})}


def uses_attention(method: str) -> bool:
    """Whether a grid method distils through GKD's attention module (its teachers need one)."""
    return method_overrides(method).get("kd") in C.GKD_METHODS

# What teacher_overrides and student_overrides may set. A distilled student feeds its own clips to the
# teacher, so teachers and students may differ in size, schedule and loss weights but not in how clips
# are cut.
MODEL_OVERRIDES = {
    "epochs", "lr", "batch_size", "schedule", "momentum", "weight_decay", "width", "dropout", "warmup", "grad_clip",
    "modality", "keep_time", "head_channels", "reg_weight", "bg_weight", "det_optimizer",
}

SPEC_KEYS = {
    "experiment", "dataset", "transfer", "size", "overrides", "teacher_overrides", "transfer_overrides",
    "teachers", "students", "self_distill", "fractions", "seeds", "teacher_seed", "teacher_seeds", "tau", "lam",
    "weighting", "alpha", "finetune", "cache_teacher", "tuned", "student_overrides", "ssl",
    "fraction_overrides", "keep_checkpoints", "kd", "recipe", "task", "kd_stage",
}
DATASET_KEYS = {"name", "root", "split", "fraction", "split_dir"}
# When a PCL grid (`ssl: pcl`) distils, the KD paper's two readings (../shared/methods/pcl.md §4):
# during_ssl trains each student inside PCL with KD on its action head (reading A); after_ssl
# pretrains each student inside PCL without labels or teacher, then trains it supervised, with KD
# or from scratch, from that encoder (reading B).
KD_STAGES = ("during_ssl", "after_ssl")
# What `tuned:` may name besides a teacher's name: the studies of the scratch twins, and of every
# distilled cell whose teacher has no studies of its own.
TUNED_ARMS = ("scratch", "kd")


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
class TeacherSpec:
    """One teacher recipe of a grid: `name` is how its distilled cells and their labels call it (the
    architecture unless the spec names it), `overrides` its own model overrides on top of
    `teacher_overrides` (e.g. `modality: res`, so one architecture can teach from RGB and from
    residual frames in the same grid)."""

    name: str
    arch: str
    overrides: dict[str, Any] = field(default_factory=dict)


def teacher_runs(teachers: list[TeacherSpec], seeds: list[int]) -> list[tuple[TeacherSpec, int, str]]:
    """One run per teacher recipe and seed: (recipe, seed, the name its distilled cells call it by).
    The name is the recipe's with one seed, and `<name>-s<seed>` with several."""
    several = len(seeds) > 1
    return [(t, seed, f"{t.name}-s{seed}" if several else t.name) for t in teachers for seed in seeds]


@dataclass(frozen=True)
class GridSpec:
    """A whole study: every field is plain data read from YAML."""

    experiment: str
    dataset: DatasetSpec
    teachers: list[TeacherSpec]
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
    # Each teacher recipe is trained once per seed, on all training videos; with several seeds every
    # distilled cell is repeated per teacher run, so a row of the report is one teacher run.
    teacher_seeds: list[int] = field(default_factory=lambda: [0])
    tau: float = C.KDConfig.tau
    lam: float = C.KDConfig.lam
    weighting: str = C.KDConfig.weighting
    alpha: float = C.KDConfig.alpha
    finetune: bool = False
    cache_teacher: bool = False
    # Optuna studies whose best settings cells take: "scratch", "kd" or a teacher's name -> studies;
    # each cell takes the study that measured its own configuration (`spec.tuned_plan`).
    tuned: dict[str, list[str]] = field(default_factory=dict)
    # "pcl": students (scratch and distilled) train inside PCL; teachers and fine-tunes stay supervised.
    ssl: str = "none"
    # With ssl "pcl": "during_ssl", KD inside PCL, or "after_ssl", KD from a PCL-pretrained encoder (KD_STAGES).
    kd_stage: str = "during_ssl"
    # A finished cell's model is in the tracking store; its checkpoint (optimizer state and all) is
    # deleted unless this is set (the paper's grid would otherwise leave ~18 GB behind).
    keep_checkpoints: bool = False
    # The distillation methods of the KD cells (`--kd`): with gkd or gkd+logit the teachers train with
    # GKD's attention module (all methods distil from them) and each scratch cell gets a twin with the
    # attention module and no teacher ("scratch + attention").
    kd_methods: list[str] = field(default_factory=lambda: ["logit"])
    # "recognition" (clips) or "detection" (windows of untrimmed videos, `kdhar detect`'s runs): with
    # detection every cell trains a temporal detector, the teachers with GKD's attention module when
    # a KD method is gkd, and "logit" is the per-step score distillation.
    task: str = "recognition"
    # What every cell trains with (kdhar.config.RECIPES): "gkd" is GKD's recipe for the size
    # (kdhar.config.GKD_RECIPE) for every cell, so that the rows are matched twins; None: "gkd" when
    # a method uses the attention module, else "preset".
    recipe: str | None = None

    @property
    def attention(self) -> bool:
        """Whether a method distils through GKD's attention module (teachers train with one, and every
        scratch cell gets a "scratch + attention" twin)."""
        return any(uses_attention(m) for m in self.kd_methods)

    @property
    def cell_recipe(self) -> str:
        return self.recipe or ("gkd" if self.attention else "preset")

    @property
    def teacher_seed(self) -> int:
        """The first teacher seed (a grid of one teacher run per recipe has only this one)."""
        return self.teacher_seeds[0]

    def teacher_runs(self) -> list[tuple[TeacherSpec, int, str]]:
        """Every teacher run of the grid (`teacher_runs`)."""
        return teacher_runs(self.teachers, self.teacher_seeds)

    @property
    def kd(self) -> C.KDConfig:
        """The distillation settings of the KD cells."""
        return C.KDConfig(tau=self.tau, weighting=self.weighting, alpha=self.alpha, lam=self.lam)
