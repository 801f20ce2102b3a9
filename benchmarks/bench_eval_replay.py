"""Evaluation pass time: decoding the test clips every epoch against replaying them from memory.

A training run evaluates the validation and test splits after every epoch. Their clips are fixed,
so `ReplayLoader` keeps the decoded batches of the first pass and replays them afterwards. This
times, side by side in one process, `epochs` evaluation passes of a width-8 C3D at the CPU preset's
clip size over the synthetic UCF101 test split: once through the plain loader, once through
`ReplayLoader` (its first pass decodes, the rest replay), and checks both give the same scores.

    kdhar data synth && python benchmarks/bench_eval_replay.py --root data/synthetic/ucf101
"""

from __future__ import annotations

import argparse
import time

import torch

from kdhar.config import CPU_PRESET, ClipConfig
from kdhar.data.dataset import ReplayLoader, VideoClipDataset, make_loader
from kdhar.data.index import load_index
from kdhar.engine import evaluate
from kdhar.models import build_model


def timed_passes(loader, model, num_classes: int, epochs: int) -> tuple[list[float], dict]:
    times, result = [], {}
    for _ in range(epochs):
        start = time.perf_counter()
        result = evaluate(model, loader, "cpu", num_classes)
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synthetic/ucf101")
    parser.add_argument("--epochs", type=int, default=4, help="evaluation passes per loader")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    index = load_index("ucf101", args.root, 1, "test")
    clip = ClipConfig(**CPU_PRESET["clip"])
    dataset = VideoClipDataset(index, clip, train=False)
    model = build_model("c3d", len(index.classes), width=8, dropout=0.0).eval()

    plain = make_loader(dataset, 16, shuffle=False, num_workers=0)
    replay = ReplayLoader(make_loader(dataset, 16, shuffle=False, num_workers=0), max_bytes=2**30)
    plain_times, plain_result = timed_passes(plain, model, len(index.classes), args.epochs)
    replay_times, replay_result = timed_passes(replay, model, len(index.classes), args.epochs)
    assert plain_result["video_top1"] == replay_result["video_top1"] and plain_result["loss"] == replay_result["loss"]
    kept = sum(b["clip"].nbytes for b in replay.batches or [])

    print(f"{len(dataset)} test clips of {clip.clip_len}x{clip.crop}x{clip.crop}, {args.epochs} passes each, "
          f"{args.threads} threads; replay keeps {kept / 2**20:.0f} MiB")
    print("| loader | first pass s | later passes s (mean) | all passes s |")
    print("|---|---|---|---|")
    for name, times in (("decode every pass", plain_times), ("ReplayLoader", replay_times)):
        later = sum(times[1:]) / max(1, len(times) - 1)
        print(f"| {name} | {times[0]:.1f} | {later:.1f} | {sum(times):.1f} |")
    print(f"ratio, all passes: {sum(plain_times) / sum(replay_times):.2f}x faster with replay; "
          f"later passes {(sum(plain_times[1:]) / max(1e-9, sum(replay_times[1:]))):.1f}x")


if __name__ == "__main__":
    main()
