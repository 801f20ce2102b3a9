"""Clip-loading throughput: the kdhar loader against a whole-video PyAV baseline.

Writes its own UCF101-like videos (320x240 MPEG-4 AVI, 25 fps, 5-7 s, a single keyframe as in
UCF101's XviD files) into a temporary folder, then times one epoch of training clips for:

* naive: decode the whole video with PyAV, then index the clip's frames;
* decord, decode at 320x240 then resize with torchvision;
* decord, resize inside the decoder (the kdhar default);

each with 0 and 2 DataLoader workers. Every variant uses the same sampling, augmentation and
DataLoader, so only the decoding differs.

    python benchmarks/bench_loader.py --videos 40
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdhar.config import ClipConfig
from kdhar.data import sampling
from kdhar.data.dataset import VideoClipDataset, make_loader
from kdhar.data.index import DatasetIndex, VideoSample
from kdhar.data.transforms import apply_params, draw_params
from kdhar.data.video import write_video

HEIGHT, WIDTH, FPS = 240, 320, 25


def make_videos(folder: Path, count: int, seed: int) -> list[VideoSample]:
    """Smooth texture panning over a moving bright square: real motion for the encoder to code."""
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(count):
        frames_n = int(rng.integers(5 * FPS, 7 * FPS + 1))
        coarse = rng.integers(40, 216, (HEIGHT // 16 + 2, WIDTH // 16 + 2, 3), dtype=np.uint8)
        texture = coarse.repeat(16, axis=0).repeat(16, axis=1)
        dy, dx = rng.integers(1, 4, size=2)
        frames = np.empty((frames_n, HEIGHT, WIDTH, 3), np.uint8)
        for t in range(frames_n):
            frames[t] = np.roll(texture, (dy * t, dx * t), axis=(0, 1))[:HEIGHT, :WIDTH]
            y, x = (40 + 2 * t) % (HEIGHT - 40), (60 + 3 * t) % (WIDTH - 40)
            frames[t, y : y + 40, x : x + 40] = 250
        path = folder / f"c{k % 4}" / f"v_c{k % 4}_g{k:02d}_c01.avi"
        # UCF101-like encoding: one keyframe per file and a few hundred kbit/s.
        write_video(path, frames, fps=FPS, bit_rate=400_000, gop_size=300)
        samples.append(VideoSample(path, k % 4, f"g{k:02d}"))
    return samples


class PyAVWholeVideoDataset(VideoClipDataset):
    """The baseline: decode every frame with PyAV, keep the clip's frames, then augment as kdhar does."""

    def _load(self, item: int, view: int) -> dict:
        import av

        clip = self.clip
        sample = self.samples[item]
        with av.open(str(sample.path)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        rng = np.random.default_rng([self.seed, view, item])
        start = sampling.train_clip_start(rng, len(frames), clip.clip_len, clip.frame_interval)
        frames = frames[sampling.clip_indices(start, clip.clip_len, clip.frame_interval, len(frames))]
        params = draw_params(rng, frames.shape[1:3], clip.resize, clip.crop, augment=clip.augment)
        return {"clip": apply_params(frames, params), "label": sample.label, "index": item, "view": view}


def measure(dataset: VideoClipDataset, batch_size: int, workers: int) -> tuple[float, float]:
    """Returns (clips/s of wall time, main-process CPU ms per clip) for epoch 1.

    Epoch 0 warms up the persistent workers (process start, decoder import). The CPU figure is
    only meaningful without workers; it does not move with the machine's load, the wall time does.
    """
    loader = make_loader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, seed=0)
    dataset.set_epoch(0)
    for _ in loader:
        pass
    dataset.set_epoch(1)
    wall, cpu = time.perf_counter(), time.process_time()
    clips = sum(len(batch["label"]) for batch in loader)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return clips / wall, 1000 * cpu / clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=40, help="number of videos to write and read")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true", help="eval transforms only (resize + centre crop)")
    args = parser.parse_args()
    # One intra-op thread in the main process too, so 0 and 2 workers compare processes, not threads.
    torch.set_num_threads(1)
    clip = ClipConfig(clip_len=args.clip_len, augment=not args.no_augment)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        samples = make_videos(Path(tmp), args.videos, args.seed)
        print(
            f"wrote {len(samples)} videos ({WIDTH}x{HEIGHT} MPEG-4, {FPS} fps, 5-7 s) in "
            f"{time.perf_counter() - start:.1f} s; clip_len={clip.clip_len}, resize={clip.resize}, "
            f"crop={clip.crop}, augment={clip.augment}, batch={args.batch_size}"
        )
        index = DatasetIndex(samples=samples, classes=[f"c{k}" for k in range(4)], root=Path(tmp))
        variants = {
            "naive (PyAV whole video)": lambda: PyAVWholeVideoDataset(index, clip, train=True),
            "decord, decode then resize": lambda: VideoClipDataset(index, clip, True, resize_in_decoder=False),
            "decord, resize in decoder": lambda: VideoClipDataset(index, clip, True, resize_in_decoder=True),
        }
        results: dict[tuple[str, int], tuple[float, float]] = {}
        for workers in (0, 2):
            for name, build in variants.items():
                rate, cpu_ms = results[name, workers] = measure(build(), args.batch_size, workers)
                cpu = f", {cpu_ms:6.1f} CPU ms/clip" if workers == 0 else ""
                print(f"{name:<28} workers={workers}: {rate:6.1f} clips/s{cpu}", flush=True)

    kdhar, naive = "decord, resize in decoder", "naive (PyAV whole video)"
    for workers in (0, 2):
        ratio = results[kdhar, workers][0] / results[naive, workers][0]
        print(f"kdhar loader / naive, workers={workers}: {ratio:.1f}x clips/s")
    print(f"kdhar loader / naive, CPU per clip: {results[naive, 0][1] / results[kdhar, 0][1]:.1f}x")


if __name__ == "__main__":
    main()
