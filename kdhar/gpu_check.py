"""`kdhar bench gpu`: what a paper-size training step costs on this machine's GPU, and which CUDA
settings the engine should use.

For the default teacher (C3D, trained on labels) and student (tiny3d, distilled from a C3D) at
the paper's size, it measures, in one run sized to a time budget:

* training clips/s on synthetic tensors (a pinned batch copied to the GPU each step, no loader)
  for bf16 autocast on/off x channels_last_3d on/off (all four, eager, interleaved), then
  torch.compile on top of the best of those, side by side with its eager twin;
* peak GPU memory (`torch.cuda.max_memory_allocated`) of each configuration;
* MFU: FLOPs per clip from `kdhar.models.describe` (the torch FLOP counter) x 3 for forward +
  backward (the student's KD step adds one forward of its frozen teacher), over the device's
  dense bf16 peak;
* the loader's clips/s alone (decord decoding real video files, the paper's augmentation,
  `VideoClipDataset` + `make_loader` as `run_training` builds them, no frame cache), and
  training end to end through it, so it says whether training is loader-bound.

A setting is kept only where it is faster (geometric mean over teacher and student, by at least
`MARGIN`); otherwise the engine's current CUDA default stays. `dry_run` runs the same code at a
tiny size on the CPU, a couple of steps per configuration, for CI.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Dense bf16 tensor-core peaks (no structured sparsity), from the vendor spec sheets, matched in
# order against torch.cuda.get_device_name(): the first pattern that matches wins.
PEAK_SOURCE = "vendor spec sheets, dense"
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"B200", "B200", 2250.0),
    (r"H200 NVL", "H200 NVL", 835.0),
    (r"GH200", "GH200", 989.0),
    (r"H200", "H200 SXM", 989.0),
    (r"H100 PCIe", "H100 PCIe", 756.0),
    (r"H100(?!.*NVL)", "H100 SXM", 989.0),
    (r"A100", "A100", 312.0),
    (r"L40S", "L40S", 362.0),
    (r"L40\b", "L40", 181.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10\b", "A10", 125.0),
    (r"RTX 6000 Ada", "RTX 6000 Ada", 364.0),
    (r"RTX A6000", "RTX A6000", 155.0),
    (r"RTX 4090", "RTX 4090", 165.0),
)
# A setting must be at least this much faster to replace the engine's default (timing noise).
MARGIN = 0.02
# What the FLOPs of one training clip are, for the JSON and the printout.
FLOP_RULE = ("forward FLOPs per clip from kdhar.models.describe (torch's FLOP counter) x 3 for forward + "
             "backward; the KD step adds 1 x the frozen teacher's forward")
DEFAULT_JSON = Path("benchmarks/results/gpu.json")


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 TFLOP/s) of a GPU from `PEAK_BF16_TFLOPS`, or None when it is not listed."""
    for pattern, label, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return label, tflops
    return None


def default_json_path() -> Path:
    """$OUT/gpu.json when $OUT is set (a job's output folder), else benchmarks/results/gpu.json."""
    out = os.environ.get("OUT")
    return Path(out) / "gpu.json" if out else DEFAULT_JSON


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

    @property
    def train_flops(self) -> int:
        return 3 * self.forward_flops + self.teacher_flops


def _modules(step: nn.Module) -> list[nn.Module]:
    teacher = getattr(step, "teacher", None)  # a KD step's teacher is not a registered submodule
    return [step, teacher] if isinstance(teacher, nn.Module) else [step]


class Runner:
    """A workload's step, optimiser and settings, built fresh (same seed, so every runner starts
    from the same weights) and laid out as the setting says."""

    def __init__(self, workload: Workload, setting: Setting, device: torch.device, optim, compile_backend: str):
        from kdhar.engine import train_step

        self.workload, self.setting, self.device = workload, setting, device
        torch.manual_seed(0)
        step = workload.build().to(device)
        if setting.channels_last:
            step.to(memory_format=torch.channels_last_3d)  # as train_one_epoch does on CUDA
        step.train()
        self.step = step
        # The run's optimiser (run_training): SGD over the step's parameters (a KD teacher has none there).
        self.optimizer = torch.optim.SGD(step.parameters(), lr=optim.lr, momentum=optim.momentum,
                                         weight_decay=optim.weight_decay)
        self.call = torch.compile(step, backend=compile_backend) if setting.compile else step
        self.amp = torch.bfloat16 if setting.bf16 else torch.float32  # float32: autocast off
        self.grad_clip = optim.grad_clip
        self._train_step = train_step
        self.times: dict[str, list[float]] = {}  # phase -> seconds per step, one entry per timed block
        self.peak_bytes: dict[str, int] = {}  # phase -> peak GPU bytes of this runner
        self.first_step_s: float | None = None
        self.error: str | None = None

    def __call__(self, batch: dict[str, Any]) -> None:
        self._train_step(self.call, batch, self.optimizer, self.device, self.amp, self.grad_clip,
                         channels_last=self.setting.channels_last)

    def resident_bytes(self) -> int:
        """GPU bytes this runner holds between steps: weights, buffers, gradients, optimiser state."""
        tensors = [t for m in _modules(self.step) for t in (*m.parameters(), *m.buffers())]
        tensors += [p.grad for p in self.step.parameters() if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        seen, total = set(), 0
        for t in tensors:
            if t.device.type != "cuda":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def clips_per_s(self, batch_size: int, phase: str) -> float | None:
        times = self.times.get(phase)
        return batch_size / statistics.median(times) if times else None

    def peak_mib(self, phase: str) -> float | None:
        return self.peak_bytes[phase] / 2**20 if phase in self.peak_bytes else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_block(runner: Runner, next_batch: Callable[[], dict[str, Any]], steps: int, phase: str) -> float:
    """Seconds per step over `steps` steps, recorded under `phase` with the runner's peak GPU memory.

    Other runners' weights stay resident while this one runs, so its peak is the allocator's peak
    less what was allocated beforehand, plus what this runner itself held then.
    """
    device = runner.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) - runner.resident_bytes()
    start = time.perf_counter()
    for _ in range(steps):
        runner(next_batch())
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    runner.times.setdefault(phase, []).append(seconds)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
        runner.peak_bytes[phase] = max(runner.peak_bytes.get(phase, 0), peak)
    return seconds


def warm_up(runner: Runner, batch: dict[str, Any], steps: int) -> float:
    """Runs `steps` untimed steps (kernel selection, compilation); returns the per-step estimate."""
    start = time.perf_counter()
    runner(batch)
    _sync(runner.device)
    runner.first_step_s = time.perf_counter() - start
    if steps <= 1:
        return runner.first_step_s
    return timed_block(runner, lambda: batch, steps - 1, "warmup")


def interleaved(runners: list[Runner], batch: dict[str, Any], seconds: float, rounds: int, estimates: dict[int, float],
                max_steps: int, phase: str) -> None:
    """Rounds that time every runner once each (so a load change hits them all alike); each runner
    gets about the same share of `seconds`."""
    share = seconds / max(1, rounds * len(runners))
    steps = {id(r): max(1, min(max_steps, int(share / max(estimates[id(r)], 1e-6)))) for r in runners}
    for _ in range(rounds):
        for r in runners:
            timed_block(r, lambda: batch, steps[id(r)], phase)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def speedup(runners: dict[tuple[str, Setting], Runner], roles: list[str], a: Setting, b: Setting, batch: int,
            phase: str) -> float | None:
    """Geometric mean over the workloads of clips/s at `a` over clips/s at `b`, both timed in `phase`."""
    ratios = []
    for role in roles:
        ra, rb = runners.get((role, a)), runners.get((role, b))
        cps_a = ra.clips_per_s(batch, phase) if ra else None
        cps_b = rb.clips_per_s(batch, phase) if rb else None
        if not cps_a or not cps_b:
            return None
        ratios.append(cps_a / cps_b)
    return geomean(ratios)


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


def epochs(loader, dataset) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch, as a training run sees them."""
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


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


def run_check(
    *,
    dry_run: bool = False,
    budget_s: float = 300.0,
    root: str = "data/synthetic/ucf101",
    default_root: str = "data/synthetic/ucf101",
    teacher: str = "c3d",
    student: str = "tiny3d",
    batch_size: int | None = None,
    num_workers: int = 2,
    device: str = "auto",
    deterministic: bool | None = None,
    peak_tflops_override: float | None = None,
    compile_backend: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the check and returns its results (what `kdhar bench gpu` writes as JSON)."""
    from kdhar import config as C
    from kdhar.data.dataset import VideoClipDataset, make_loader
    from kdhar.data.index import load_index
    from kdhar.engine import set_determinism
    from kdhar.experiments import DatasetSpec, build_run_config
    from kdhar.models import MODELS, build_model, describe
    from kdhar.objectives import KDStep, SupervisedStep
    from kdhar.train import pick_device

    for arch in (teacher, student):
        if arch not in MODELS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(MODELS)}")
    if budget_s <= 0:
        raise ValueError(f"--budget-s {budget_s}: must be > 0 seconds")
    if num_workers < 0:
        raise ValueError(f"--num-workers {num_workers}: must be >= 0")
    clock = Clock(budget_s)
    dev = torch.device("cpu") if dry_run and device == "auto" else pick_device(device)
    plan = Plan.for_run(dry_run, num_workers, compile_backend)
    # The paper's size (the dataclass defaults, `--size paper`); the dry run shrinks it.
    overrides: dict[str, Any] = {"num_workers": num_workers}
    if dry_run:
        overrides.update(width=4, clip_len=4, crop=32, resize=(36, 48), batch_size=4)
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    dataset_spec = DatasetSpec(name="ucf101", root=root)

    def run_config(arch: str) -> C.RunConfig:
        return build_run_config(arch, size="paper", overrides=overrides, dataset=dataset_spec, fraction=1.0, seed=0,
                                kd=C.KDConfig())

    t_cfg, s_cfg = run_config(teacher), run_config(student)
    clip, optim = s_cfg.clip, s_cfg.optim
    batch = optim.batch_size
    torch.set_num_threads(optim.threads)
    det = optim.deterministic if deterministic is None else deterministic
    det_note = set_determinism(optim.seed, det)

    with tempfile.TemporaryDirectory(prefix="kdhar-bench-gpu-") as tmp:
        data_root, generated = _data(root, default_root, clip.clip_len * clip.frame_interval, dry_run, Path(tmp), log)
        index = load_index("ucf101", data_root, 1, "train")
        classes = len(index.classes)
        video = _video_info(index.samples[0].path)

        t_fwd = describe(teacher, classes, t_cfg.model.width, clip.clip_len, clip.crop)["flops"]
        s_fwd = describe(student, classes, s_cfg.model.width, clip.clip_len, clip.crop)["flops"]
        kd = s_cfg.kd

        def build_teacher_step() -> nn.Module:
            return SupervisedStep(build_model(teacher, classes, width=t_cfg.model.width, dropout=t_cfg.model.dropout))

        def build_student_step() -> nn.Module:
            frozen = build_model(teacher, classes, width=t_cfg.model.width, dropout=t_cfg.model.dropout)
            net = build_model(student, classes, width=s_cfg.model.width, dropout=s_cfg.model.dropout)
            return KDStep(net, frozen, tau=kd.tau, lam=kd.lam, weighting=kd.weighting, alpha=kd.alpha)

        workloads = [
            Workload("teacher", teacher, f"{teacher} (labels)", build_teacher_step, t_fwd),
            Workload("student", student, f"{student} (KD from {teacher})", build_student_step, s_fwd, t_fwd),
        ]
        roles = [w.role for w in workloads]

        if dev.type == "cuda":
            name = torch.cuda.get_device_name(dev)
            capability = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        else:
            name, capability = "cpu", None
        found = peak_tflops(name) if dev.type == "cuda" else None
        if peak_tflops_override is not None:
            peak, peak_source = float(peak_tflops_override), "--peak-tflops"
        else:
            peak = found[1] if found else None
            peak_source = f"{PEAK_SOURCE} ({found[0]})" if found else "unknown"

        def mfu(clips_per_s: float | None, w: Workload) -> float | None:
            if clips_per_s is None or peak is None:
                return None
            return clips_per_s * w.train_flops / (peak * 1e12)

        g = torch.Generator().manual_seed(0)
        synthetic = {"clip": torch.randn(batch, 3, clip.clip_len, clip.crop, clip.crop, generator=g),
                     "label": torch.randint(0, classes, (batch,), generator=g)}
        if dev.type == "cuda":
            synthetic = {k: v.pin_memory() for k, v in synthetic.items()}  # as the run's loader pins
        where = f"{dev} ({name})" if dev.type == "cuda" else str(dev)
        log(f"device {where}, {'dry run, tiny size' if dry_run else 'size paper'}: batch {batch}x3x"
            f"{clip.clip_len}x{clip.crop}x{clip.crop} from {clip.resize[0]}x{clip.resize[1]}, widths "
            f"{teacher} {t_cfg.model.width} / {student} {s_cfg.model.width}, budget {budget_s:.0f} s")

        # ---- A: the four eager settings, interleaved
        runners: dict[tuple[str, Setting], Runner] = {}
        estimates: dict[int, float] = {}
        for w in workloads:
            for s in EAGER:
                r = Runner(w, s, dev, optim, plan.compile_backend)
                estimates[id(r)] = warm_up(r, synthetic, plan.warmup_steps)
                runners[(w.role, s)] = r
        eager = [runners[(w.role, s)] for w in workloads for s in EAGER]
        interleaved(eager, synthetic, 0.25 * clock.left(), plan.rounds, estimates, plan.max_steps, "eager")
        default = engine_default()
        score = {s: geomean([runners[(role, s)].clips_per_s(batch, "eager") for role in roles]) for s in EAGER}
        best = max(EAGER, key=lambda s: score[s])
        chosen_eager = default if score[default] * (1 + MARGIN) >= score[best] else best
        log(f"eager settings measured ({clock.elapsed():.0f} s); best {best.name}, chosen {chosen_eager.name}")

        # Free what is no longer timed: compilation and the loader's pinned batches want the room.
        keep = {chosen_eager, default}
        for key in [k for k in runners if k[1] not in keep]:
            runners[key].step = runners[key].call = runners[key].optimizer = None  # results stay
        _free(dev)

        # ---- B: torch.compile on the chosen eager setting, side by side with its eager twin
        compiled = dataclasses.replace(chosen_eager, compile=True)
        compile_skipped = None
        for w in workloads:
            r = Runner(w, compiled, dev, optim, plan.compile_backend)
            runners[(w.role, compiled)] = r
            if compile_skipped is None and not dry_run and clock.elapsed() > 0.6 * budget_s:
                compile_skipped = f"skipped: {clock.elapsed():.0f} s of the {budget_s:.0f} s budget gone before compiling"
            if compile_skipped:
                r.error = compile_skipped
                continue
            try:
                estimates[id(r)] = warm_up(r, synthetic, plan.warmup_steps)
            except Exception as exc:  # a missing compiler or an unsupported op: compile stays off
                r.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                log(f"torch.compile failed for {w.label}: {r.error}")
        pairs = [x for w in workloads if not runners[(w.role, compiled)].error
                 for x in (runners[(w.role, chosen_eager)], runners[(w.role, compiled)])]
        if pairs:
            interleaved(pairs, synthetic, 0.3 * clock.left(), plan.rounds, estimates, plan.max_steps, "compile")
        compile_gain = speedup(runners, roles, compiled, chosen_eager, batch, "compile")
        chosen = compiled if compile_gain is not None and compile_gain >= 1 + MARGIN else chosen_eager

        def step_rate(role: str, s: Setting) -> float | None:
            """Clips/s on synthetic tensors: eager settings from phase A, compiled ones side by side."""
            return runners[(role, s)].clips_per_s(batch, "compile" if s.compile else "eager")

        log(f"torch.compile measured ({clock.elapsed():.0f} s)")

        # ---- C: the loader alone, then training end to end through it
        pin = dev.type == "cuda"
        train_ds = VideoClipDataset(index, clip, train=True, seed=optim.seed, on_bad=s_cfg.data.on_bad, cache_bytes=0)
        if len(train_ds) < batch:
            raise ValueError(f"{data_root} has {len(train_ds)} training videos, fewer than a batch of {batch}")
        loader = make_loader(train_ds, batch, shuffle=True, num_workers=num_workers, seed=optim.seed, pin_memory=pin)
        stream = epochs(loader, train_ds)
        for _ in range(plan.loader_warm_batches):
            next(stream)
        loader_s = 0.3 * clock.left()
        n_batches, clips, start = 0, 0, time.perf_counter()
        while True:
            clips += int(next(stream)["clip"].shape[0])
            n_batches += 1
            if n_batches >= 2 and (dry_run or time.perf_counter() - start >= loader_s):
                break
        loader_cps = clips / (time.perf_counter() - start)

        e2e_settings = [chosen] + ([default] if default != chosen else [])
        e2e: list[dict[str, Any]] = []
        e2e_runs = [(w, s) for w in workloads for s in e2e_settings]
        for i, (w, s) in enumerate(e2e_runs):
            r = runners[(w.role, s)]
            step_cps = step_rate(w.role, s)
            per_batch = max(batch / step_cps if step_cps else 0.0, batch / loader_cps)
            seconds = 0.95 * clock.left() / (len(e2e_runs) - i)
            steps = plan.e2e_max_steps if dry_run else max(2, min(plan.e2e_max_steps, int(seconds / per_batch)))
            for _ in range(plan.loader_warm_batches):
                r(next(stream))
            cps = batch / timed_block(r, lambda: next(stream), steps, "e2e")
            e2e.append({"model": w.role, "arch": w.arch, "setting": s.name, **s.as_dict(), "clips_per_s": cps,
                        "steps": steps, "of_synthetic": cps / step_cps if step_cps else None, "mfu": mfu(cps, w),
                        "peak_mem_mib": r.peak_mib("e2e")})
        del stream, loader
        _free(dev)

    configs = []
    for w in workloads:
        for s in (*EAGER, compiled):
            r = runners[(w.role, s)]
            phase = "compile" if s.compile else "eager"
            cps = step_rate(w.role, s)
            entry = {"model": w.role, "arch": w.arch, "label": w.label, "setting": s.name, **s.as_dict(),
                     "clips_per_s": cps, "ms_per_step": 1e3 * batch / cps if cps else None,
                     "timed_blocks": len(r.times.get(phase, [])), "first_step_s": r.first_step_s,
                     "peak_mem_mib": r.peak_mib(phase), "mfu": mfu(cps, w), "error": r.error}
            if s.compile:  # what its eager twin did in the same rounds
                entry["eager_twin_clips_per_s"] = runners[(w.role, chosen_eager)].clips_per_s(batch, "compile")
            configs.append(entry)

    effects = {
        "bf16": speedup(runners, roles, dataclasses.replace(chosen_eager, bf16=True),
                        dataclasses.replace(chosen_eager, bf16=False), batch, "eager"),
        "channels_last": speedup(runners, roles, dataclasses.replace(chosen_eager, channels_last=True),
                                 dataclasses.replace(chosen_eager, channels_last=False), batch, "eager"),
        "compile": compile_gain,
    }
    loader_bound = {}
    for w in workloads:
        step_cps = step_rate(w.role, chosen)
        loader_bound[w.role] = bool(step_cps is not None and loader_cps < step_cps)
    notes = [
        "synthetic rows: one batch of random clips (pinned on CUDA), copied to the device every step as the loader's are",
        f"loader: decord decodes every clip from {'generated synthetic videos' if generated else data_root} "
        f"({video['width']}x{video['height']}), no frame cache, the paper's augmentation "
        f"{'on' if clip.augment else 'off'}, {_workers(num_workers)}; end to end leaves out the first "
        f"{plan.loader_warm_batches} batch{'es' if plan.loader_warm_batches != 1 else ''} of each run (the workers' "
        "start and queue)",
        "the KD step's frozen teacher runs under bf16 autocast on CUDA whatever the setting (LogitKD.run_teacher)",
        f"{'deterministic kernels, cuDNN autotuning off (as runs by default)' if det else 'cuDNN autotuning on'}",
    ]
    if compile_skipped:
        notes.append(f"torch.compile {compile_skipped}")
    if dry_run:
        notes.append(f"dry run: {plan.warmup_steps} warm-up and {plan.rounds} timed steps per configuration; "
                     f"torch.compile with the {plan.compile_backend!r} backend (graph capture, no code generation)")
    differs = [k for k, v in chosen.as_dict().items() if v != default.as_dict()[k]]
    if dev.type != "cuda":
        recommendation = (f"measured on {dev.type}{' (dry run)' if dry_run else ''}: not a CUDA measurement, "
                          "the engine's CUDA defaults stay as they are")
    elif differs:
        recommendation = ("the measurement recommends changing kdhar/engine.py's CUDA default: "
                          + ", ".join(f"{k} {'on' if getattr(chosen, k) else 'off'}" for k in differs))
    else:
        recommendation = ("the engine's CUDA defaults (bf16 autocast, channels_last_3d, no torch.compile) are the "
                          "fastest measured")
    return {
        "dry_run": dry_run,
        "device": {"type": dev.type, "name": name, "capability": capability, "torch": torch.__version__,
                   "cuda": torch.version.cuda},
        "size": "dry-run (tiny)" if dry_run else "paper",
        "batch_size": batch,
        "clip": {"clip_len": clip.clip_len, "frame_interval": clip.frame_interval, "resize": list(clip.resize),
                 "crop": clip.crop, "augment": clip.augment},
        "models": {w.role: {"arch": w.arch, "label": w.label,
                            "width": (t_cfg if w.role == "teacher" else s_cfg).model.width,
                            "forward_gflops_per_clip": w.forward_flops / 1e9,
                            "teacher_forward_gflops_per_clip": w.teacher_flops / 1e9,
                            "train_gflops_per_clip": w.train_flops / 1e9} for w in workloads},
        "flop_rule": FLOP_RULE,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "data": {"root": str(root), "generated": generated, "train_videos": len(index.samples), "classes": classes,
                 "first_video": video},
        "deterministic": det,
        "determinism": det_note,
        "threads": torch.get_num_threads(),
        "compile_backend": plan.compile_backend,
        "configs": configs,
        "effects": effects,
        "margin": MARGIN,
        "loader": {"clips_per_s": loader_cps, "num_workers": num_workers, "augment": clip.augment, "batches": n_batches,
                   "frame_cache": False},
        "end_to_end": e2e,
        "loader_bound": loader_bound,
        "engine_default": default.as_dict(),
        "chosen": chosen.as_dict(),
        "chosen_setting": chosen.name,
        "matches_engine": not differs,
        "recommendation": recommendation,
        "notes": notes,
        "budget_s": budget_s,
        "seconds": clock.elapsed(),
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _workers(n: int) -> str:
    return f"{n} worker{'s' if n != 1 else ''}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(res: dict[str, Any]) -> str:
    """The table and the verdict lines `kdhar bench gpu` prints."""
    lines = []
    e2e = {(e["model"], e["setting"]): e for e in res["end_to_end"]}
    head = (f"{'model':<24}{'setting':<19}{'clips/s':>9}{'ms/step':>9}{'peak MiB':>10}{'MFU':>8}"
            f"{'e2e clips/s':>13}{'e2e MFU':>9}  note")
    lines.append(head)
    lines.append("-" * len(head))
    for c in res["configs"]:
        row = e2e.get((c["model"], c["setting"]))
        note = []
        if c["setting"] == res["chosen_setting"]:
            note.append("chosen")
        if not c["compile"] and c["bf16"] == res["engine_default"]["bf16"] and \
                c["channels_last"] == res["engine_default"]["channels_last"]:
            note.append("engine's CUDA default")
        if c["compile"] and c.get("first_step_s") is not None and not c["error"]:
            note.append(f"first step {c['first_step_s']:.1f} s")
        if c["compile"] and c.get("eager_twin_clips_per_s"):
            note.append(f"eager twin {c['eager_twin_clips_per_s']:.1f}")
        if c["error"]:
            note.append(c["error"][:60])
        lines.append(
            f"{c['label']:<24}{c['setting']:<19}{_fmt(c['clips_per_s'], '.1f'):>9}{_fmt(c['ms_per_step'], '.1f'):>9}"
            f"{_fmt(c['peak_mem_mib'], '.0f'):>10}{_pct(c['mfu']):>8}{_fmt(row and row['clips_per_s'], '.1f'):>13}"
            f"{_pct(row and row['mfu']):>9}  {', '.join(note)}")
    lines.append("")
    lines.append(f"MFU: {res['flop_rule']}; against the dense bf16 peak ({res['peak_source']}"
                 + (f": {res['peak_tflops']:g} TFLOP/s" if res["peak_tflops"] else "; pass --peak-tflops") + ")")
    fx = res["effects"]
    lines.append("effect (geometric mean over the two models, at the chosen other settings): "
                 + ", ".join(f"{k} {v:.2f}x" if v else f"{k} not measured" for k, v in fx.items()))
    loader = res["loader"]
    for role, bound in res["loader_bound"].items():
        step = next(c for c in res["configs"] if c["model"] == role and c["setting"] == res["chosen_setting"])
        run = e2e.get((role, res["chosen_setting"]))
        lines.append(
            f"{step['label']}: step {_fmt(step['clips_per_s'], '.1f')} clips/s, loader {loader['clips_per_s']:.1f} "
            f"clips/s ({_workers(loader['num_workers'])}, augmentation {'on' if loader['augment'] else 'off'}), end to end "
            f"{_fmt(run and run['clips_per_s'], '.1f')} -> "
            + ("loader-bound" if bound else "not loader-bound"))
    where = "CUDA settings" if res["device"]["type"] == "cuda" else f"settings on {res['device']['type']} (not for CUDA)"
    lines.append(f"chosen {where}: bf16 autocast {'on' if res['chosen']['bf16'] else 'off'}, channels_last_3d "
                 f"{'on' if res['chosen']['channels_last'] else 'off'}, torch.compile "
                 f"{'on' if res['chosen']['compile'] else 'off'} (kept only where >= {100 * res['margin']:.0f} % faster)")
    lines.extend(f"note: {n}" for n in res["notes"])
    lines.append(res["recommendation"])
    lines.append(f"took {res['seconds']:.1f} s (budget {res['budget_s']:.0f} s)")
    return "\n".join(lines)


def write_json(res: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
    return path
