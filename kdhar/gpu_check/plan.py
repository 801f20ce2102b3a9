"""What the GPU check measures: the settings grid, the two workloads at the paper's size, the data
they read and how long each phase may run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from kdhar.config import ClipConfig, OptimConfig, RunConfig
    from kdhar.data.index import DatasetIndex


@dataclass(frozen=True)
class Setting:
    """One CUDA configuration of the training step."""

    bf16: bool
    channels_last: bool
    compile: bool = False

    @property
    def name(self) -> str:
        return ("bf16" if self.bf16 else "fp32") + ("+cl3d" if self.channels_last else "") + (
            "+compile" if self.compile else "")

    def as_dict(self) -> dict[str, bool]:
        return {"bf16": self.bf16, "channels_last": self.channels_last, "compile": self.compile}


def engine_default() -> Setting:
    """What kdhar.engine does on CUDA today: bf16 autocast, channels_last_3d, no torch.compile."""
    from kdhar.engine import resolve_amp_dtype, uses_channels_last

    return Setting(bf16=resolve_amp_dtype("cuda", None) is torch.bfloat16, channels_last=uses_channels_last("cuda"))


EAGER = tuple(Setting(bf16, cl) for bf16 in (False, True) for cl in (False, True))


@dataclass
class Workload:
    """A training step to measure: the teacher on labels, or the student distilled from a teacher."""

    role: str
    arch: str
    label: str
    build: Callable[[], nn.Module]
    forward_flops: int  # per clip, of the network being trained
    teacher_flops: int = 0  # per clip, of a frozen teacher's forward (KD)
    width: int = 0  # of the network being trained

    @property
    def train_flops(self) -> int:
        return 3 * self.forward_flops + self.teacher_flops


@dataclass
class Clock:
    """The run's time budget."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return max(0.0, self.budget_s - self.elapsed())


@dataclass
class Plan:
    """How long and how often things run: the real check, or the dry run's couple of steps."""

    warmup_steps: int
    rounds: int
    max_steps: int
    loader_warm_batches: int
    e2e_max_steps: int
    compile_backend: str

    @classmethod
    def for_run(cls, dry_run: bool, num_workers: int, compile_backend: str | None) -> Plan:
        if dry_run:
            return cls(warmup_steps=1, rounds=2, max_steps=1, loader_warm_batches=1, e2e_max_steps=2,
                       compile_backend=compile_backend or "eager")
        # The loader's queue holds 2 batches per worker: the rate is steady only once it has drained.
        return cls(warmup_steps=3, rounds=5, max_steps=500, loader_warm_batches=2 * num_workers + 1,
                   e2e_max_steps=2000, compile_backend=compile_backend or "inductor")


@dataclass
class Setup:
    """The check's choices before anything is measured: sizes, step counts, the two run configurations."""

    dry_run: bool
    plan: Plan
    teacher: RunConfig
    student: RunConfig
    num_workers: int

    @property
    def clip(self) -> ClipConfig:
        return self.student.clip

    @property
    def optim(self) -> OptimConfig:
        return self.student.optim

    @property
    def batch(self) -> int:
        return self.student.optim.batch_size


def check_arguments(teacher: str, student: str, budget_s: float, num_workers: int) -> None:
    """Raises ValueError naming the option that is out of range, before anything is built."""
    from kdhar.models import MODELS

    for arch in (teacher, student):
        if arch not in MODELS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(MODELS)}")
    if budget_s <= 0:
        raise ValueError(f"--budget-s {budget_s}: must be > 0 seconds")
    if num_workers < 0:
        raise ValueError(f"--num-workers {num_workers}: must be >= 0")


def make_setup(*, dry_run: bool, root: str, teacher: str, student: str, batch_size: int | None, num_workers: int,
               compile_backend: str | None) -> Setup:
    """The paper's size (the dataclass defaults, `--size paper`); the dry run shrinks it."""
    from kdhar import config as C
    from kdhar.experiments import DatasetSpec, build_run_config

    overrides: dict[str, Any] = {"num_workers": num_workers}
    if dry_run:
        overrides.update(width=4, clip_len=4, crop=32, resize=(36, 48), batch_size=4)
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    dataset_spec = DatasetSpec(name="ucf101", root=root)

    def run_config(arch: str) -> C.RunConfig:
        return build_run_config(arch, size="paper", overrides=overrides, dataset=dataset_spec, fraction=1.0, seed=0,
                                kd=C.KDConfig())

    return Setup(dry_run, Plan.for_run(dry_run, num_workers, compile_backend), run_config(teacher),
                 run_config(student), num_workers)


@dataclass
class Data:
    """The videos the loader reads: `root` as given, where they are, and what they look like."""

    root: str
    path: Path
    generated: bool
    index: DatasetIndex
    video: dict[str, int]  # frames, height, width of the first video

    @property
    def classes(self) -> int:
        return len(self.index.classes)


def prepare_data(root: str, default_root: str, setup: Setup, tmp: Path, log: Callable[[str], None]) -> Data:
    """The dataset at `root`, or the synthetic set made in `tmp` when the default root is absent."""
    from kdhar.data.index import load_index

    clip = setup.clip
    path, generated = _data(root, default_root, clip.clip_len * clip.frame_interval, setup.dry_run, tmp, log)
    index = load_index("ucf101", path, 1, "train")
    return Data(root, path, generated, index, _video_info(index.samples[0].path))


def _data(root: str, default_root: str, needed_frames: int, dry_run: bool, tmp: Path, log) -> tuple[Path, bool]:
    """The dataset root: `root` when it exists, else (for the default root only) a small synthetic
    set generated into `tmp`, with at least `needed_frames` frames per video."""
    path = Path(root)
    if path.exists():
        return path, False
    if root != default_root:
        raise FileNotFoundError(f"dataset root {root} does not exist; check --root (or omit it to use the synthetic set)")
    from kdhar.data.synthetic import SynthSpec, generate

    if dry_run:
        spec = SynthSpec(num_classes=2, groups=3, clips_per_group=2, frames=max(8, needed_frames), size=(48, 64))
    else:
        # UCF101's 320x240, so decoding costs what it costs on the real set.
        spec = SynthSpec(num_classes=10, groups=10, clips_per_group=4, frames=max(32, needed_frames), size=(240, 320))
    log(f"{root} not found: generating {spec.num_classes * spec.groups * spec.clips_per_group} synthetic videos "
        f"({spec.size[1]}x{spec.size[0]}, {spec.frames} frames) into a temporary folder")
    ds = generate(tmp / "ucf101", layout="ucf101", spec=spec, workers=max(1, min(8, os.cpu_count() or 1)))
    return ds.root, True


def _video_info(path: Path) -> dict[str, int]:
    from kdhar.data.video import VideoFile

    with VideoFile(path) as reader:
        frames = reader.num_frames
        height, width = reader.read([0]).shape[1:3]
    return {"frames": frames, "height": int(height), "width": int(width)}


def workloads(setup: Setup, classes: int) -> list[Workload]:
    """The teacher trained on labels and the student distilled from it, with their FLOPs per clip."""
    from kdhar.models import build_model, describe
    from kdhar.objectives import KDStep, SupervisedStep

    t_cfg, s_cfg, clip, kd = setup.teacher, setup.student, setup.clip, setup.student.kd
    teacher, student = t_cfg.model.arch, s_cfg.model.arch
    t_fwd = describe(teacher, classes, t_cfg.model.width, clip.clip_len, clip.crop)["flops"]
    s_fwd = describe(student, classes, s_cfg.model.width, clip.clip_len, clip.crop)["flops"]

    def build_teacher_step() -> nn.Module:
        return SupervisedStep(build_model(teacher, classes, width=t_cfg.model.width, dropout=t_cfg.model.dropout))

    def build_student_step() -> nn.Module:
        frozen = build_model(teacher, classes, width=t_cfg.model.width, dropout=t_cfg.model.dropout)
        net = build_model(student, classes, width=s_cfg.model.width, dropout=s_cfg.model.dropout)
        return KDStep(net, frozen, tau=kd.tau, lam=kd.lam, weighting=kd.weighting, alpha=kd.alpha)

    return [
        Workload("teacher", teacher, f"{teacher} (labels)", build_teacher_step, t_fwd, width=t_cfg.model.width),
        Workload("student", student, f"{student} (KD from {teacher})", build_student_step, s_fwd, t_fwd,
                 width=s_cfg.model.width),
    ]
