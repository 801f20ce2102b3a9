"""What does a PCL training step cost next to a supervised one, and how much of it is data loading?

Part 1 times three training steps on one batch, interleaved (supervised, pcl, pcl+kd, supervised,
...) so that a noisy, shared machine slows all of them alike, and reports medians:

- supervised: CE on one clip per video (SupervisedStep)
- pcl:        PCL on a tuple of 3 clips per video (pretext + memory-bank NCE + action CE), PCLStep
- pcl+kd:     the same with logit KD from a teacher run on the first and last clips

The FLOP ideal of pcl/supervised is 3 (three clips through the trunk, forward and backward; the
heads are negligible), and of pcl+kd/supervised 3 + 2 x teacher forward / student training step,
all counted by torch's FlopCounterMode.

Part 2 trains pcl steps from a real DataLoader over the synthetic videos (`kdhar data synth`), with
`--workers` loader processes, then the same batches again from memory: loading's share of a step is
1 - (steps from memory) / (steps from the loader).

    python benchmarks/bench_pcl.py                          # CPU size
    python benchmarks/bench_pcl.py --device cuda --student r3d_18 --width 64 --teacher-width 64 \\
        --clip-len 10 --crop 112 --size paper
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _timing import count_flops, interleaved_times

from kdhar.config import PCLConfig
from kdhar.engine import train_step
from kdhar.models import build_model
from kdhar.objectives import SupervisedStep
from kdhar.objectives.kd import LogitKD
from kdhar.objectives.pcl import PCLStep


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--student", default="c3d")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--teacher", default="r3d_18")
    p.add_argument("--teacher-width", type=int, default=8)
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--crop", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each times every variant once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--root", default="data/synthetic/ucf101", help="videos for part 2 (skipped when absent)")
    p.add_argument("--size", default="cpu", choices=["cpu", "paper"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for part 2")
    p.add_argument("--batches", type=int, default=12, help="batches timed in part 2")
    return p.parse_args()


def step_costs(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    student = build_model(args.student, args.num_classes, width=args.width, modality="res").to(device)
    teacher = build_model(args.teacher, args.num_classes, width=args.teacher_width, modality="res").to(device)
    b, pcl_cfg = args.batch_size, PCLConfig(ssl="pcl")
    supervised = SupervisedStep(student)
    pcl = PCLStep(student, num_rows=1024, pcl=pcl_cfg).to(device)
    pcl_kd = PCLStep(student, num_rows=1024, pcl=pcl_cfg, kd=LogitKD(teacher, tau=4.0, weighting="mix")).to(device)
    pcl_kd.pretext_head, pcl_kd.projector = pcl.pretext_head, pcl.projector  # one set of heads
    params = list(pcl.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    clip = (3, args.clip_len, args.crop, args.crop)
    labels = torch.randint(0, args.num_classes, (b,))
    clip_batch = {"clip": torch.randn(b, *clip), "label": labels}
    tuple_batch = {"clips": torch.randn(b, 3, *clip), "label": labels, "pretext": torch.randint(0, 5, (b,)),
                   "index": torch.arange(b)}

    x, y = clip_batch["clip"].to(device), labels.to(device)
    student_train = count_flops(lambda: supervised(x, y)["loss"].backward())
    teacher_fwd = count_flops(lambda: pcl_kd.kd.run_teacher(x))
    optimizer.zero_grad(set_to_none=True)

    variants = {
        "supervised": lambda: train_step(supervised, clip_batch, optimizer, device),
        "pcl": lambda: train_step(pcl, tuple_batch, optimizer, device),
        "pcl+kd": lambda: train_step(pcl_kd, tuple_batch, optimizer, device),
    }
    for step in (supervised, pcl, pcl_kd):
        step.train()
    times = interleaved_times(variants, device, args.warmup, args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"device={device} threads={torch.get_num_threads()} batch {b} x {clip} student={args.student}@{args.width} "
          f"teacher={args.teacher}@{args.teacher_width} res frames, repeats={args.repeats} (interleaved, medians)")
    print(f"student training step on one clip: {student_train / 1e9:.2f} GFLOP   teacher forward: {teacher_fwd / 1e9:.2f} GFLOP")
    for name, t in times.items():
        print(f"{name:>11}: {med[name] * 1e3:8.1f} ms/step  (min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f})")
    print(f"pcl/supervised     measured {med['pcl'] / med['supervised']:.2f}   FLOP ideal 3.00")
    ideal_kd = 3 + 2 * teacher_fwd / student_train
    print(f"pcl+kd/supervised  measured {med['pcl+kd'] / med['supervised']:.2f}   FLOP ideal {ideal_kd:.2f}")


def loading_share(args: argparse.Namespace, device: torch.device) -> None:
    from kdhar.data.dataset import make_loader
    from kdhar.experiments import DatasetSpec, build_run_config
    from kdhar.objectives import build_objective
    from kdhar.train import load_splits

    if not Path(args.root).exists():
        print(f"part 2 skipped: {args.root} not found (kdhar data synth)")
        return
    cfg = build_run_config(args.student, size=args.size, overrides={"ssl": "pcl", "width": args.width},
                           dataset=DatasetSpec("ucf101", args.root), fraction=1.0, seed=0)
    objective = build_objective(cfg)
    train = objective.make_data(load_splits(cfg).train, 0, 0)  # no frame cache: every batch is decoded
    loader = make_loader(train, cfg.optim.batch_size, shuffle=True, num_workers=args.workers, seed=0)
    model = build_model(args.student, len(train.classes), width=args.width, modality=cfg.model.modality)
    step = objective.make_step(model, len(train)).to(device)
    optimizer = torch.optim.SGD(step.parameters(), lr=1e-3, momentum=0.9)
    step.train()
    batches = []
    it = iter(loader)
    batches.append(next(it))  # workers started, first batch in: not timed
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
        batches.append(batch)
        train_step(step, batch, optimizer, device)
    from_loader = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[1:]:
        train_step(step, batch, optimizer, device)
    from_memory = time.perf_counter() - start
    print(f"\nreal tuples from {args.root}: {args.batches} batches of {cfg.optim.batch_size} x "
          f"{tuple(batches[1]['clips'].shape[1:])}, {args.workers} loader workers")
    print(f"steps from the loader {from_loader / args.batches * 1e3:.0f} ms/batch, from memory "
          f"{from_memory / args.batches * 1e3:.0f} ms/batch: loading's share of a step {1 - from_memory / from_loader:.0%}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step_costs(args, device)
    loading_share(args, device)


if __name__ == "__main__":
    main()
