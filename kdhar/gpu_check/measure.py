"""Measuring one setting of one workload: its training step timed in interleaved rounds, its peak
GPU memory and MFU, and the loader's rate alone and under training end to end."""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdhar.gpu_check.plan import Clock, Plan, Setting, Setup, Workload

if TYPE_CHECKING:
    from kdhar.config import OptimConfig
    from kdhar.gpu_check.plan import Data

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
# What the FLOPs of one training clip are, for the JSON and the printout.
FLOP_RULE = ("forward FLOPs per clip from kdhar.models.describe (torch's FLOP counter) x 3 for forward + "
             "backward; the KD step adds 1 x the frozen teacher's forward")


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 TFLOP/s) of a GPU from `PEAK_BF16_TFLOPS`, or None when it is not listed."""
    for pattern, label, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return label, tflops
    return None


@dataclass
class Device:
    """The device measured on, and the peak its MFU is taken against."""

    dev: torch.device
    name: str
    capability: str | None
    peak: float | None
    peak_source: str

    @classmethod
    def of(cls, dev: torch.device, peak_override: float | None) -> Device:
        if dev.type == "cuda":
            name = torch.cuda.get_device_name(dev)
            capability = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        else:
            name, capability = "cpu", None
        found = peak_tflops(name) if dev.type == "cuda" else None
        if peak_override is not None:
            return cls(dev, name, capability, float(peak_override), "--peak-tflops")
        return cls(dev, name, capability, found[1] if found else None,
                   f"{PEAK_SOURCE} ({found[0]})" if found else "unknown")

    def mfu(self, clips_per_s: float | None, w: Workload) -> float | None:
        """Model FLOPs utilisation: the workload's training FLOPs at `clips_per_s` over the peak."""
        if clips_per_s is None or self.peak is None:
            return None
        return clips_per_s * w.train_flops / (self.peak * 1e12)


def _modules(step: nn.Module) -> list[nn.Module]:
    teacher = getattr(step, "teacher", None)  # a KD step's teacher is not a registered submodule
    return [step, teacher] if isinstance(teacher, nn.Module) else [step]


class Runner:
    """A workload's step, optimiser and settings, built fresh (same seed, so every runner starts
    from the same weights) and laid out as the setting says."""

    def __init__(self, workload: Workload, setting: Setting, device: torch.device, optim: OptimConfig,
                 compile_backend: str):
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

    def release(self) -> None:
        """Drops the step, its compiled call and optimiser; the timings and peaks stay."""
        self.step = self.call = self.optimizer = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Returns released tensors' memory to the device (compilation and pinned batches want the room)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def synthetic_batch(setup: Setup, classes: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """One batch of random clips, pinned on CUDA as the run's loader pins its batches."""
    clip, batch = setup.clip, setup.batch
    g = torch.Generator().manual_seed(0)
    synthetic = {"clip": torch.randn(batch, 3, clip.clip_len, clip.crop, clip.crop, generator=g),
                 "label": torch.randint(0, classes, (batch,), generator=g)}
    if dev.type == "cuda":
        synthetic = {k: v.pin_memory() for k, v in synthetic.items()}
    return synthetic


@dataclass
class Bench:
    """What every phase of the measurement shares: the device, budget, workloads and their runners."""

    device: Device
    plan: Plan
    clock: Clock
    optim: OptimConfig
    synthetic: dict[str, torch.Tensor]
    workloads: list[Workload]
    dry_run: bool
    log: Callable[[str], None]
    runners: dict[tuple[str, Setting], Runner] = field(default_factory=dict)
    estimates: dict[int, float] = field(default_factory=dict)  # id(runner) -> seconds per step

    @property
    def batch(self) -> int:
        return int(self.synthetic["clip"].shape[0])

    @property
    def roles(self) -> list[str]:
        return [w.role for w in self.workloads]

    def runner(self, w: Workload, s: Setting) -> Runner:
        """A new runner of `w` at `s`, recorded for the report."""
        r = Runner(w, s, self.device.dev, self.optim, self.plan.compile_backend)
        self.runners[(w.role, s)] = r
        return r

    def step_rate(self, role: str, s: Setting) -> float | None:
        """Clips/s on synthetic tensors: eager settings from their own rounds, compiled ones side by side."""
        return self.runners[(role, s)].clips_per_s(self.batch, "compile" if s.compile else "eager")


def measure_eager(bench: Bench, settings: tuple[Setting, ...]) -> None:
    """Every workload at every eager setting, warmed up, then timed in interleaved rounds."""
    plan = bench.plan
    for w in bench.workloads:
        for s in settings:
            r = bench.runner(w, s)
            bench.estimates[id(r)] = warm_up(r, bench.synthetic, plan.warmup_steps)
    eager = [bench.runners[(w.role, s)] for w in bench.workloads for s in settings]
    interleaved(eager, bench.synthetic, 0.25 * bench.clock.left(), plan.rounds, bench.estimates, plan.max_steps,
                "eager")


def release_except(bench: Bench, keep: set[Setting]) -> None:
    """Frees the runners no later phase times: compilation and the loader's pinned batches want the room."""
    for key, r in bench.runners.items():
        if key[1] not in keep:
            r.release()
    free(bench.device.dev)


def measure_compile(bench: Bench, eager: Setting, compiled: Setting) -> str | None:
    """torch.compile at `compiled`, timed side by side with its eager twin; returns why it was
    skipped (most of the budget gone), or None. A compile that fails leaves its runner's error."""
    clock, plan, skipped = bench.clock, bench.plan, None
    for w in bench.workloads:
        r = bench.runner(w, compiled)
        if skipped is None and not bench.dry_run and clock.elapsed() > 0.6 * clock.budget_s:
            skipped = f"skipped: {clock.elapsed():.0f} s of the {clock.budget_s:.0f} s budget gone before compiling"
        if skipped:
            r.error = skipped
            continue
        try:
            bench.estimates[id(r)] = warm_up(r, bench.synthetic, plan.warmup_steps)
        except Exception as exc:  # a missing compiler or an unsupported op: compile stays off
            r.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            bench.log(f"torch.compile failed for {w.label}: {r.error}")
    pairs = [x for w in bench.workloads if not bench.runners[(w.role, compiled)].error
             for x in (bench.runners[(w.role, eager)], bench.runners[(w.role, compiled)])]
    if pairs:
        interleaved(pairs, bench.synthetic, 0.3 * clock.left(), plan.rounds, bench.estimates, plan.max_steps,
                    "compile")
    return skipped


def epochs(loader, dataset) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch, as a training run sees them."""
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


@dataclass
class LoaderRates:
    """The loader alone and training end to end through it."""

    clips_per_s: float
    batches: int
    end_to_end: list[dict[str, Any]]


def measure_loader(bench: Bench, setup: Setup, data: Data, settings: list[Setting]) -> LoaderRates:
    """The loader's clips/s alone (decord decoding, the paper's augmentation, no frame cache), then
    each workload trained end to end through it at each of `settings`."""
    from kdhar.data.dataset import VideoClipDataset, make_loader

    optim, batch = setup.optim, setup.batch
    pin = bench.device.dev.type == "cuda"
    train_ds = VideoClipDataset(data.index, setup.clip, train=True, seed=optim.seed, on_bad=setup.student.data.on_bad,
                                cache_bytes=0)
    if len(train_ds) < batch:
        raise ValueError(f"{data.path} has {len(train_ds)} training videos, fewer than a batch of {batch}")
    loader = make_loader(train_ds, batch, shuffle=True, num_workers=setup.num_workers, seed=optim.seed, pin_memory=pin)
    stream = epochs(loader, train_ds)
    for _ in range(bench.plan.loader_warm_batches):
        next(stream)
    loader_s = 0.3 * bench.clock.left()
    n_batches, clips, start = 0, 0, time.perf_counter()
    while True:
        clips += int(next(stream)["clip"].shape[0])
        n_batches += 1
        if n_batches >= 2 and (bench.dry_run or time.perf_counter() - start >= loader_s):
            break
    loader_cps = clips / (time.perf_counter() - start)
    e2e = _end_to_end(bench, stream, settings, loader_cps)
    del stream, loader
    free(bench.device.dev)
    return LoaderRates(loader_cps, n_batches, e2e)


def _end_to_end(bench: Bench, stream: Iterator[dict[str, Any]], settings: list[Setting],
                loader_cps: float) -> list[dict[str, Any]]:
    """Each workload's kept runners trained on the loader's batches, sized to what is left of the budget."""
    plan, batch = bench.plan, bench.batch
    e2e: list[dict[str, Any]] = []
    e2e_runs = [(w, s) for w in bench.workloads for s in settings]
    for i, (w, s) in enumerate(e2e_runs):
        r = bench.runners[(w.role, s)]
        step_cps = bench.step_rate(w.role, s)
        per_batch = max(batch / step_cps if step_cps else 0.0, batch / loader_cps)
        seconds = 0.95 * bench.clock.left() / (len(e2e_runs) - i)
        steps = plan.e2e_max_steps if bench.dry_run else max(2, min(plan.e2e_max_steps, int(seconds / per_batch)))
        for _ in range(plan.loader_warm_batches):
            r(next(stream))
        cps = batch / timed_block(r, lambda: next(stream), steps, "e2e")
        e2e.append({"model": w.role, "arch": w.arch, "setting": s.name, **s.as_dict(), "clips_per_s": cps,
                    "steps": steps, "of_synthetic": cps / step_cps if step_cps else None,
                    "mfu": bench.device.mfu(cps, w), "peak_mem_mib": r.peak_mib("e2e")})
    return e2e
