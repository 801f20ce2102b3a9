"""Decoding once per run: the training frame cache and the evaluation replay, against decoding every epoch.

At the CPU preset decoding is a large share of an epoch. Two measurements, each side by side in
one process on the synthetic UCF101 split 1 at the CPU preset's clip size:

* training: `epochs` passes of the training loader (no model: decoding, sampling and cropping
  only) with `VideoClipDataset(cache_bytes=0)` and with the frame cache a training run uses;
* evaluation: `epochs` evaluation passes of a width-8 C3D over the test split through the plain
  loader and through `ReplayLoader`, which must give the same scores.

    kdhar data synth && python benchmarks/bench_decode_cache.py --root data/synthetic/ucf101
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
from kdhar.train import TRAIN_FRAME_CACHE_BYTES


def timed_passes(loader, model, num_classes: int, epochs: int) -> tuple[list[float], dict]:
    times, result = [], {}
    for _ in range(epochs):
        start = time.perf_counter()
        result = evaluate(model, loader, "cpu", num_classes)
        times.append(time.perf_counter() - start)
    return times, result


def training_passes(dataset: VideoClipDataset, epochs: int) -> list[float]:
    loader = make_loader(dataset, 16, shuffle=True, num_workers=0)
    times = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        start = time.perf_counter()
        for _ in loader:
            pass
        times.append(time.perf_counter() - start)
    return times


def row(name: str, times: list[float]) -> str:
    later = sum(times[1:]) / max(1, len(times) - 1)
    return f"| {name} | {times[0]:.1f} | {later:.1f} | {sum(times):.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synthetic/ucf101")
    parser.add_argument("--epochs", type=int, default=4, help="passes per loader")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clip = ClipConfig(**CPU_PRESET["clip"])
    train_index = load_index("ucf101", args.root, 1, "train")
    uncached = training_passes(VideoClipDataset(train_index, clip, train=True), args.epochs)
    cached_ds = VideoClipDataset(train_index, clip, train=True, cache_bytes=TRAIN_FRAME_CACHE_BYTES)
    cached = training_passes(cached_ds, args.epochs)
    print(f"training: {len(train_index.samples)} videos, {args.epochs} epochs, {args.threads} threads; "
          f"the cache holds {cached_ds._cached_bytes / 2**20:.0f} MiB")
    print("| training loader | first epoch s | later epochs s (mean) | all epochs s |")
    print("|---|---|---|---|")
    print(row("decode every epoch", uncached))
    print(row("frame cache", cached))
    print(f"ratio, all epochs: {sum(uncached) / sum(cached):.2f}x faster with the cache\n")

    index = load_index("ucf101", args.root, 1, "test")
    dataset = VideoClipDataset(index, clip, train=False)
    model = build_model("c3d", len(index.classes), width=8, dropout=0.0).eval()
    plain = make_loader(dataset, 16, shuffle=False, num_workers=0)
    replay = ReplayLoader(make_loader(dataset, 16, shuffle=False, num_workers=0), max_bytes=2**30)
    plain_times, plain_result = timed_passes(plain, model, len(index.classes), args.epochs)
    replay_times, replay_result = timed_passes(replay, model, len(index.classes), args.epochs)
    assert plain_result["video_top1"] == replay_result["video_top1"] and plain_result["loss"] == replay_result["loss"]
    kept = sum(b["clip"].nbytes for b in replay.batches or [])
    print(f"evaluation: {len(dataset)} test clips of {clip.clip_len}x{clip.crop}x{clip.crop}, width-8 C3D, "
          f"{args.epochs} passes; replay keeps {kept / 2**20:.0f} MiB")
    print("| evaluation loader | first pass s | later passes s (mean) | all passes s |")
    print("|---|---|---|---|")
    print(row("decode every pass", plain_times))
    print(row("ReplayLoader", replay_times))
    print(f"ratio, all passes: {sum(plain_times) / sum(replay_times):.2f}x faster with replay")

if __name__ == "__main__":
    main()
