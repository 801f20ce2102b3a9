"""What does logit distillation cost per training step, and what should it cost?

Times three training steps on the same batch, interleaved (scratch, KD, KD-cached, scratch, ...)
so that a noisy, shared machine slows all of them alike, and reports medians:

- scratch:   CE on the student (SupervisedStep)
- kd:        CE + KD with the teacher run live (KDStep)
- kd_cached: CE + KD with the teacher's logits given (what a teacher-logit cache buys)

The FLOP-based ideal for kd/scratch is 1 + teacher forward FLOPs / student training-step FLOPs,
both counted by torch's FlopCounterMode (the training step as forward + backward).

    python benchmarks/bench_kd_step.py                 # CPU size
    python benchmarks/bench_kd_step.py --device cuda --teacher-width 64 --student r3d_18 \\
        --student-width 64 --clip-len 16 --crop 112
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _timing import count_flops, interleaved_times

from kdhar.engine import train_step
from kdhar.models import build_model
from kdhar.objectives import KDStep, SupervisedStep


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher", default="c3d")
    p.add_argument("--teacher-width", type=int, default=16)
    p.add_argument("--student", default="tiny3d")
    p.add_argument("--student-width", type=int, default=8)
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--crop", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each times every variant once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (allocator, kernel choice)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = build_model(args.student, args.num_classes, width=args.student_width).to(device)
    teacher = build_model(args.teacher, args.num_classes, width=args.teacher_width).to(device)
    scratch = SupervisedStep(student)
    kd = KDStep(student, teacher, tau=4.0, lam=1.0)
    if device.type == "cuda":
        # The layout train_one_epoch gives the networks on CUDA.
        kd.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)

    shape = (args.batch_size, 3, args.clip_len, args.crop, args.crop)
    batch = {"clip": torch.randn(shape), "label": torch.randint(0, args.num_classes, (args.batch_size,))}
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    cached = dict(batch, teacher_logits=kd.run_teacher(batch["clip"].to(device)).cpu())

    x, y = batch["clip"].to(device), batch["label"].to(device)
    teacher_fwd = count_flops(lambda: kd.run_teacher(x))
    student_train = count_flops(lambda: scratch(x, y)["loss"].backward())
    optimizer.zero_grad(set_to_none=True)

    variants = {
        "scratch": lambda: train_step(scratch, batch, optimizer, device),
        "kd": lambda: train_step(kd, batch, optimizer, device),
        "kd_cached": lambda: train_step(kd, cached, optimizer, device),
    }
    kd.train()
    times = interleaved_times(variants, device, args.warmup, args.repeats)

    med = {name: statistics.median(t) for name, t in times.items()}
    ideal = 1 + teacher_fwd / student_train
    print(
        f"device={device} threads={torch.get_num_threads()} batch={shape} "
        f"student={args.student}@{args.student_width} teacher={args.teacher}@{args.teacher_width} "
        f"repeats={args.repeats} (interleaved, medians)"
    )
    print(f"student training step: {student_train / 1e9:.2f} GFLOP   teacher forward: {teacher_fwd / 1e9:.2f} GFLOP")
    for name, t in times.items():
        print(f"{name:>10}: {med[name] * 1e3:8.1f} ms/step  (min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f})")
    # Why measured and ideal can differ: the teacher's forward and the student's training step need
    # not run at the same FLOP rate (wider layers, no backward kernels).
    teacher_s = med["kd"] - med["kd_cached"]
    print(
        f"throughput: student training {student_train / med['scratch'] / 1e9:.1f} GFLOP/s, "
        f"teacher forward {teacher_fwd / teacher_s / 1e9 if teacher_s > 0 else float('nan'):.1f} GFLOP/s "
        f"(kd - kd_cached = {teacher_s * 1e3:.1f} ms)"
    )
    print(f"kd/scratch        measured {med['kd'] / med['scratch']:.3f}   FLOP ideal {ideal:.3f}")
    print(f"kd_cached/scratch measured {med['kd_cached'] / med['scratch']:.3f}   FLOP ideal 1.000")


if __name__ == "__main__":
    main()
