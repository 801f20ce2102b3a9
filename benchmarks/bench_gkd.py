"""What does a GKD training step cost next to logit KD and scratch training of the same student?

GKD trains in two passes per epoch (`GKDStep.passes`): a CVAE pass (the student network forward
without gradients, its CVAE trained on the VAE loss plus generative distillation through the frozen
teacher CVAE), then a net pass (the network, adapters and attention head trained on CE, the ramped
regeneration loss and attention distillation against the frozen GKD teacher). An epoch is two
passes over the data, so one GKD step for a batch is one CVAE-pass step plus one net-pass step: the
"gkd" rows are that sum, the "cvae pass" and "net pass" rows each half. Every method trains the
same student (same architecture and initial weights, seed 0) on the same batch:

- scratch:  CE on the student (SupervisedStep, as `build_objective` makes it)
- logit-KD: CE + KD from the plain teacher run live (KDStep, the run's KDConfig)
- gkd:      GKDStep, built as `kdhar.objectives.factory._gkd_objective` does, for each variant
            ("faithful", "light"), with a GKD teacher made by `build_gkd_net` from the plain
            teacher (random weights: the cost does not depend on them), of the same variant

Each step is `kdhar.engine.train_step` (forward, backward, optimiser step) with the optimisers
`run_training` builds: SGD over `pass_parameters("net")` for the net pass (and over the step's
parameters for scratch and KD), `pass_optimizer("cvae")` (Adam) for the CVAE pass.

Time: the steps are timed interleaved (scratch, KD, faithful CVAE pass, faithful net pass, light
..., scratch, ...) in one process, so a load spike on a noisy, shared machine slows all of them
alike; medians are reported (a GKD step: the median of the per-round CVAE + net sums).

Peak memory: measured in a process of its own per configuration (every row; the "gkd" rows
alternate CVAE and net steps on one GKDStep, as training does, so both passes' optimiser state is
resident): a child forked, one at a time, from one subprocess that has imported torch and kdhar
(one subprocess per configuration where there is no fork). Each builds the configuration once and
runs one step to load what a first step loads once per process (library code pages, oneDNN
kernels, the thread pool), drops it, then measures a second instance over --memory-steps steps.
The figure is everything that instance holds at its peak: networks (student, frozen teacher,
CVAEs, adapters), the batch, optimiser state, activations and gradients.
- On CUDA: torch.cuda.max_memory_allocated over memory_allocated before the build (tensor bytes).
- On CPU: the rise of the process's resident-set high-water mark (VmHWM, reset to the current
  resident size through /proc/self/clear_refs just before the build), with glibc's mmap threshold
  pinned at 64 KiB so that freed tensors go back to the OS (torch's CPU allocator does not cache)
  and the resident size follows live memory. Why not the alternatives: tracemalloc cannot see
  torch's allocations; torch.profiler's memory records give per-op allocations, not a peak, and its
  memory timeline needs stack recording that slows the step many times over. The RSS figure also
  counts oneDNN's scratch space and allocator slack, which a real run pays too. Without
  /proc/self/clear_refs (not Linux) it falls back to the rise of ru_maxrss, an upper bound.

FLOP ideal: FLOPs of each step's forward + backward as torch's FlopCounterMode counts them
(convolutions and matrix products only: GroupNorm, interpolation and the elementwise losses are
not counted, so GKD's ideal is a lower bound), as a ratio to scratch and to logit KD.

Every row trains at GKD's recipe for the size (`recipe="gkd"`, as every cell of a GKD grid): at
size cpu the trunks keep a time axis (keep_time 2: T' = 4 of the 8 frames for C3D and the
ResNets), teacher and student see the same RGB frames. The last lines print the figure the grid's
cost is planned with: a GKD step (both passes) over a logit-KD step, measured side by side.

    python benchmarks/bench_gkd.py --threads 1                      # GKD's CPU preset (experiments/gkd-cpu.yaml's cell)
    python benchmarks/bench_gkd.py --threads 1 --json gkd_cost.json
    python benchmarks/bench_gkd.py --device cuda --width 64 --teacher-width 64 --clip-len 16 --crop 112 --batch 6
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from _timing import count_flops, interleaved_times

from kdhar.engine import train_step
from kdhar.experiments import DatasetSpec, build_run_config
from kdhar.models import build_model
from kdhar.objectives import build_objective
from kdhar.objectives.factory import Teacher
from kdhar.objectives.gkd import VARIANTS, GKDStep, build_gkd_net, feature_shape

PASSES = GKDStep.passes  # ("cvae", "net"): the order an epoch runs them
MMAP_THRESHOLD = 64 * 1024  # glibc's mmap threshold in the memory subprocesses (bytes)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--student", default="c3d")
    p.add_argument("--width", type=int, default=8, help="student width (experiments/gkd-cpu.yaml's C3D student: 8)")
    p.add_argument("--teacher", default="c3d")
    p.add_argument("--teacher-width", type=int, default=8)
    p.add_argument("--teacher-modality", default="rgb", help="GKD's teachers see the students' RGB frames")
    p.add_argument("--keep-time", type=int, default=None,
                   help="the trunks' last temporal downsamplings left out (default: GKD's recipe, 2 at size cpu)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--crop", type=int, default=56)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each times every step once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (allocator, kernel choice)")
    p.add_argument("--memory-steps", type=int, default=3, help="steps each memory subprocess runs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows and settings here")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one configuration's peak
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The configurations: "scratch", "kd", "<variant>/cvae", "<variant>/net", and (memory only)
# "<variant>/gkd", both passes alternating on one step.


@dataclass
class Built:
    """One configuration, ready to train: `run()` is one training step (a GKD step: both passes)."""

    steps: list[tuple[nn.Module, torch.optim.Optimizer, str | None]]  # (step, optimiser, pass to set or None)
    batch: dict[str, torch.Tensor]
    device: torch.device

    def run(self) -> None:
        for step, optimizer, pass_name in self.steps:
            if pass_name is not None:
                step.set_pass(pass_name)
            train_step(step, self.batch, optimizer, self.device)

    def flops(self) -> int:
        """Forward + backward FLOPs of the configuration's step(s)."""
        x = self.batch["clip"].to(self.device)
        y = self.batch["label"].to(self.device)
        total = 0
        for step, _optimizer, pass_name in self.steps:
            if pass_name is not None:
                step.set_pass(pass_name)
            total += count_flops(lambda s=step: s(x, y)["loss"].backward())
            step.zero_grad(set_to_none=True)
        return total


def run_config(args: argparse.Namespace, variant: str | None = None):
    """The run's configuration as a GKD grid builds each cell (size cpu, GKD's recipe), optionally with GKD."""
    overrides = {"width": args.width, "batch_size": args.batch, "clip_len": args.clip_len, "crop": args.crop}
    if args.keep_time is not None:
        overrides["keep_time"] = args.keep_time
    if variant is not None:
        overrides.update(kd="gkd", gkd_variant=variant)
    return build_run_config(args.student, size="cpu", overrides=overrides, recipe="gkd",
                            dataset=DatasetSpec("ucf101", "data/synthetic/ucf101"), fraction=1.0, seed=0)


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    shape = (args.batch, 3, args.clip_len, args.crop, args.crop)
    return {"clip": torch.randn(shape, generator=gen),
            "label": torch.randint(0, args.num_classes, (args.batch,), generator=gen)}


def build(name: str, args: argparse.Namespace, device: torch.device, batch: dict[str, torch.Tensor]) -> Built:
    """Builds one configuration from scratch: its own student (seed 0) and teacher (seed 1)."""
    variant, _, part = name.partition("/")
    cfg = run_config(args, variant if part else None)
    torch.manual_seed(0)
    student = build_model(cfg.model.arch, args.num_classes, width=cfg.model.width, dropout=cfg.model.dropout,
                          modality=cfg.model.modality, keep_time=cfg.model.keep_time)
    torch.manual_seed(1)
    teacher = build_model(args.teacher, args.num_classes, width=args.teacher_width, modality=args.teacher_modality,
                          keep_time=cfg.model.keep_time)
    o = cfg.optim

    def sgd(params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    if name in ("scratch", "kd"):
        source = Teacher(model=teacher, uri="benchmark", classes=[], arch=args.teacher) if name == "kd" else None
        objective = build_objective(cfg, source)
        step = objective.make_step(student, args.batch).to(device)
        steps = [(step, sgd(step.parameters()), None)]
    else:
        # As _gkd_objective's make_step with method "gkd"; the teacher, a GKD network with its CVAE
        # (what `train-teacher --attention` logs), is built from the plain teacher.
        g, clip = cfg.gkd, cfg.clip
        t_net, t_cvae = build_gkd_net(teacher, clip.clip_len, clip.crop, g.variant, g.rescale, g.norm)
        net, cvae = build_gkd_net(student, clip.clip_len, clip.crop, g.variant, g.rescale, g.norm)
        step = GKDStep(net, cvae, g, o.epochs, (clip.clip_len, clip.crop), t_net, t_cvae, kd=None).to(device)
        # run_training's optimisers: the configured SGD for "net", the pass's own for the others
        optimizers = {p: sgd(step.pass_parameters("net")) if p == "net" else step.pass_optimizer(p) for p in PASSES}
        if part == "gkd":  # both passes on one step, switched per step (memory only)
            steps = [(step, optimizers[p], p) for p in PASSES]
        else:
            step.set_pass(part)  # once, as an epoch does: not part of the timed step
            steps = [(step, optimizers[part], None)]
    for s, _, _ in steps:
        if device.type == "cuda":
            s.to(memory_format=torch.channels_last_3d)  # the layout train_one_epoch gives on CUDA
        s.train()
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return Built(steps, batch, device)


# ---------------------------------------------------------------------------------------------
# Peak memory, one fresh subprocess per configuration


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def _maxrss_kb() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def probe_memory(name: str, args: argparse.Namespace) -> dict[str, float | str]:
    """Peak MB of `args.memory_steps` steps of one configuration, in a process of its own.

    A first instance of the configuration runs one step and is dropped before the baseline, so that
    what any first step loads once per process (library code pages, oneDNN kernels, the thread
    pool) is not counted; the second instance, built after the baseline, is measured."""
    device = torch.device(args.device)
    batch = make_batch(args)
    warm = build(name, args, device, batch)
    warm.run()
    del warm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base, measure = torch.cuda.memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            base, measure = _status_kb("VmRSS") * 1024, "VmHWM rise (clear_refs)"
        except OSError:
            base, measure = _maxrss_kb() * 1024, "ru_maxrss rise (upper bound)"
    built = build(name, args, device, batch)
    for _ in range(args.memory_steps):
        built.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = (_status_kb("VmHWM") if measure.startswith("VmHWM") else _maxrss_kb()) * 1024
    return {"peak_mb": (peak - base) / 2**20, "measure": measure}


def probe_forked(names: Sequence[str], args: argparse.Namespace) -> dict[str, dict]:
    """`probe_memory` of each configuration in a child forked from this process (which has imported
    torch and kdhar once, and runs no torch op itself), one after the other."""
    results = {}
    for name in names:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read)
            code = 0
            try:
                if args.threads:
                    torch.set_num_threads(args.threads)
                out = probe_memory(name, args)
            except BaseException:  # noqa: BLE001 - reported by the parent
                out, code = {"error": traceback.format_exc()}, 1
            with os.fdopen(write, "w") as f:
                f.write(json.dumps(out))
            os._exit(code)
        os.close(write)
        with os.fdopen(read) as f:
            data = f.read()
        os.waitpid(pid, 0)
        result = json.loads(data) if data else {"error": "the probe process died"}
        if "error" in result:
            raise RuntimeError(f"memory probe {name} failed:\n{result['error']}")
        results[name] = result
    return results


def measure_memory(names: Sequence[str], argv: Sequence[str]) -> dict[str, dict]:
    """Peak memory of each configuration, in a subprocess with glibc's mmap threshold pinned: one
    that forks a child per configuration, or, without fork, one subprocess per configuration."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MMAP_THRESHOLD))
    groups = [list(names)] if hasattr(os, "fork") else [[name] for name in names]
    results = {}
    for group in groups:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe", ",".join(group)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {', '.join(group)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


# ---------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the benchmark, prints the table and returns its rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_probe:  # inside measure_memory's subprocess
        names = args.memory_probe.split(",")
        if hasattr(os, "fork"):
            print(json.dumps(probe_forked(names, args)))
        else:
            if args.threads:
                torch.set_num_threads(args.threads)
            print(json.dumps({name: probe_memory(name, args) for name in names}))
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = make_batch(args)

    timed = ["scratch", "kd"] + [f"{v}/{p}" for v in args.variants for p in PASSES]
    built = {name: build(name, args, device, batch) for name in timed}
    flops = {name: b.flops() for name, b in built.items()}
    times = interleaved_times({name: b.run for name, b in built.items()}, device, args.warmup, args.repeats)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for v in args.variants:
        times[f"{v}/gkd"] = [sum(r) for r in zip(*(times[f"{v}/{p}"] for p in PASSES))]  # per round
        ms[f"{v}/gkd"] = statistics.median(times[f"{v}/gkd"]) * 1e3
        flops[f"{v}/gkd"] = sum(flops[f"{v}/{p}"] for p in PASSES)

    order = ["scratch", "kd"] + [f"{v}/{p}" for v in args.variants for p in ("gkd", *PASSES)]
    memory = measure_memory(order, argv)
    measure = memory["scratch"]["measure"]

    labels = {"scratch": ("scratch", "-"), "kd": ("logit-KD", "-")}
    labels.update({f"{v}/{p}": ({"gkd": "gkd (cvae+net)", "cvae": "  cvae pass", "net": "  net pass"}[p], v)
                   for v in args.variants for p in ("gkd", *PASSES)})
    rows = []
    for name in order:
        mb = float(memory[name]["peak_mb"])
        rows.append({
            "config": name, "method": labels[name][0].strip(), "variant": labels[name][1],
            "ms_per_step": ms[name], "time_x_scratch": _ratio(ms[name], ms["scratch"]),
            "time_x_kd": _ratio(ms[name], ms["kd"]),
            "peak_mb": mb, "mem_x_scratch": _ratio(mb, float(memory["scratch"]["peak_mb"])),
            "mem_x_kd": _ratio(mb, float(memory["kd"]["peak_mb"])),
            "gflop": flops[name] / 1e9, "flop_x_scratch": _ratio(flops[name], flops["scratch"]),
            "flop_x_kd": _ratio(flops[name], flops["kd"]),
            "times_ms": [t * 1e3 for t in times[name]],  # per round (gkd: the round's CVAE + net)
        })

    shape = (args.batch, 3, args.clip_len, args.crop, args.crop)
    cfg = run_config(args)
    t_prime = {name: feature_shape(build_model(arch, args.num_classes, width=w, keep_time=cfg.model.keep_time),
                                   args.clip_len, args.crop)[1]
               for name, arch, w in (("student", args.student, args.width), ("teacher", args.teacher, args.teacher_width))}
    print(f"device={device} threads={torch.get_num_threads()} batch={shape} student={args.student}@{args.width} "
          f"teacher={args.teacher}@{args.teacher_width} ({args.teacher_modality}) keep_time={cfg.model.keep_time} "
          f"(T' student {t_prime['student']}, teacher {t_prime['teacher']}) repeats={args.repeats} "
          f"(interleaved, medians); peak memory: {measure}, one process per row")
    head = (f"{'method':<15} | {'variant':<8} | {'ms/step':>8} | {'xscratch':>8} | {'xlogitKD':>8} | "
            f"{'peak MB':>8} | {'xscratch':>8} | {'xlogitKD':>8} | {'GFLOP':>7} | {'FLOP xscr':>9} | {'FLOP xKD':>8}")
    print(head)
    print("-" * len(head))
    for name, r in zip(order, rows):
        print(f"{labels[name][0]:<15} | {r['variant']:<8} | {r['ms_per_step']:8.1f} | {r['time_x_scratch']:8.2f} | "
              f"{r['time_x_kd']:8.2f} | {r['peak_mb']:8.1f} | {r['mem_x_scratch']:8.2f} | {r['mem_x_kd']:8.2f} | "
              f"{r['gflop']:7.3f} | {r['flop_x_scratch']:9.2f} | {r['flop_x_kd']:8.2f}")
    print("gkd = one CVAE-pass step + one net-pass step (an epoch is both passes over the data); its peak memory "
          "alternates both on one step. FLOP ideal counts convolutions and matrix products only.")
    for v in args.variants:
        r = rows[order.index(f"{v}/gkd")]
        print(f"GKD step / logit-KD step ({v}): {r['time_x_kd']:.2f} (time, {r['ms_per_step']:.0f} vs "
              f"{ms['kd']:.0f} ms), {r['flop_x_kd']:.2f} (FLOP ideal)")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "memory_probe")}
        settings.update(threads=torch.get_num_threads(), memory_measure=measure, torch=torch.__version__,
                        keep_time=cfg.model.keep_time, t_prime=t_prime)
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
