"""Torch dataset of video clips and the DataLoader that feeds it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from kdhar.config import ClipConfig
from kdhar.data import sampling
from kdhar.data.index import DatasetIndex
from kdhar.data.transforms import apply_params, draw_params
from kdhar.data.video import VideoError, VideoFile

# Seconds a worker may take for one batch before the loader gives up: a stuck decoder then ends in
# an error instead of hanging the run.
DEFAULT_TIMEOUT_S = 300.0


class VideoClipDataset(Dataset):
    """Clips cut from the videos of an index.

    Training: one item per video, a random clip with a random augmentation, all drawn from
    `np.random.default_rng([seed, view, index])` where `view` is the epoch (or `epoch % num_views`),
    so the same (index, view) always gives the same tensor. Evaluation: one item per
    (video, clip k) for `clip.test_clips` evenly spaced clips, without augmentation.

    Items are dicts `{"clip": float (C, T, H, W), "label": int, "index": int, "view": int}`; eval
    items add `"clip_index"` (k). Keys may also be `(index, view)` tuples, which is how the sampler
    of `make_loader` passes the epoch into persistent workers.

    Args:
        index: the videos.
        clip: clip length, stride, test clips, resize, crop and whether to augment.
        train: training items (random clips) or evaluation items (K clips per video).
        seed: base seed of every random draw.
        on_bad: "error" raises `VideoError` on an undecodable video; "skip" returns None for it,
            which `collate_clips` drops and counts.
        num_views: cycle through this many fixed views instead of a new one every epoch.
        resize_in_decoder: let the decoder scale frames to `clip.resize` instead of resizing
            full-size frames afterwards (faster with workers; see benchmarks/bench_loader.py).
        cache_bytes: keep each video's decoded frames (uint8, at the decoder's size) in memory
            after its first read, until they take this many bytes, and cut later clips from
            memory; 0 turns it off. Items are the same either way. Each loader worker process
            keeps its own cache.
    """

    def __init__(
        self,
        index: DatasetIndex,
        clip: ClipConfig,
        train: bool,
        seed: int = 0,
        on_bad: str = "error",
        num_views: int | None = None,
        resize_in_decoder: bool = True,
        cache_bytes: int = 0,
    ) -> None:
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        if num_views is not None and num_views < 1:
            raise ValueError(f"num_views must be >= 1 or None, got {num_views}")
        self.samples = list(index.samples)
        self.classes = list(index.classes)
        self.clip = clip
        self.train = train
        self.seed = seed
        self.on_bad = on_bad
        self.num_views = num_views
        self.resize_in_decoder = resize_in_decoder
        self.view = 0
        self.cache_bytes = cache_bytes
        self._frames: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the view of every following training item (used by `make_loader`'s sampler too)."""
        self.view = epoch % self.num_views if self.num_views else epoch

    def __len__(self) -> int:
        return len(self.samples) if self.train else len(self.samples) * self.clip.test_clips

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        item, view = key if isinstance(key, tuple) else (key, self.view)
        try:
            return self._load(int(item), int(view))
        except VideoError:
            if self.on_bad == "error":
                raise
            return None  # dropped and counted by collate_clips

    def _load(self, item: int, view: int) -> dict[str, Any]:
        clip = self.clip
        video, k = (item, None) if self.train else divmod(item, clip.test_clips)
        sample = self.samples[video]
        size = tuple(clip.resize) if self.resize_in_decoder and clip.resize is not None else None
        rng = np.random.default_rng([self.seed, view, video]) if self.train else None

        def indices(n: int) -> np.ndarray:
            if k is None:
                start = sampling.train_clip_start(rng, n, clip.clip_len, clip.frame_interval)
            else:
                start = sampling.test_clip_starts(n, clip.clip_len, clip.frame_interval, clip.test_clips)[k]
            return sampling.clip_indices(start, clip.clip_len, clip.frame_interval, n)

        frames = self._read(video, sample.path, size, indices)
        params = draw_params(
            rng, frames.shape[1:3], clip.resize, clip.crop, augment=self.train and clip.augment, hflip=clip.hflip
        )
        out = {"clip": apply_params(frames, params, clip.normalize), "label": sample.label, "index": video, "view": view}
        if k is not None:
            out["clip_index"] = k
        return out

    def _read(self, video: int, path: Path, size: tuple[int, int] | None, indices) -> np.ndarray:
        """The frames `indices(num_frames)` picks, from the cache or the file (then cached if room)."""
        cached = self._frames.get(video)
        if cached is not None:
            return cached[np.clip(indices(len(cached)), 0, len(cached) - 1)]
        with VideoFile(path, size) as reader:
            n = reader.num_frames
            if self._cached_bytes >= self.cache_bytes:
                return reader.read(indices(n))
            every = reader.read(np.arange(n))
        if self._cached_bytes + every.nbytes <= self.cache_bytes:
            self._frames[video] = every
            self._cached_bytes += every.nbytes
        return every[np.clip(indices(len(every)), 0, len(every) - 1)]


def collate_clips(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stacks items into a batch, dropping the None of skipped bad videos; `batch["skipped"]` counts them."""
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if not kept:
        # Empty tensors keep the batch's keys, so a training loop can skip it without special cases.
        batch: dict[str, Any] = {
            "clip": torch.empty(0),
            "label": torch.empty(0, dtype=torch.long),
            "index": torch.empty(0, dtype=torch.long),
        }
    else:
        batch = default_collate(kept)
    batch["skipped"] = skipped
    return batch


class EpochSampler(Sampler):
    """Yields `(index, view)` keys, reading the view from the dataset in the main process.

    Persistent workers hold a copy of the dataset made when they started, so `set_epoch` on the
    main copy never reaches them; passing the view inside each key does.
    """

    def __init__(self, dataset: VideoClipDataset, shuffle: bool, seed: int,
                 shard: tuple[int, int, int] | None = None) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        # (rank, world, per-rank batch) of a data-parallel run: this rank's part of every global
        # batch of the single-process order (the global batches stay the single-process ones; the
        # last incomplete global batch is dropped, as a single-process training loader drops it).
        self.shard = shard

    def _order(self) -> np.ndarray:
        n = len(self.dataset)
        # The order depends on the view too, so each epoch sees the videos in a new order.
        order = np.random.default_rng([self.seed, self.dataset.view]).permutation(n) if self.shuffle else np.arange(n)
        if self.shard is None:
            return order
        rank, world, batch = self.shard
        full = order[: len(order) - len(order) % (world * batch)].reshape(-1, world, batch)
        return full[:, rank].reshape(-1)

    def __len__(self) -> int:
        if self.shard is None:
            return len(self.dataset)
        rank, world, batch = self.shard
        return len(self.dataset) // (world * batch) * batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        view = self.dataset.view
        return iter([(int(i), view) for i in self._order()])


def make_loader(
    dataset: VideoClipDataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 2,
    seed: int = 0,
    pin_memory: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    shard: tuple[int, int] | None = None,
    collate_fn: Callable[[list], dict[str, Any]] | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` that honours `set_epoch`, drops bad items and seeds its workers.

    Training datasets drop the last incomplete batch (a batch of one breaks batch norm). Call
    `dataset.set_epoch(epoch)` before iterating; the view is taken when iteration starts.

    Args:
        timeout: seconds to wait for one batch from the workers before raising.
        shard: (rank, world) of a data-parallel run: `batch_size` is the rank's share and the rank
            reads its part of every global batch (`EpochSampler`).
        collate_fn: how items become a batch; `collate_clips` when None (windows of untrimmed
            videos: `window_dataset.collate_windows`).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(dataset, shuffle, seed, shard=(*shard, batch_size) if shard else None),
        num_workers=num_workers,
        collate_fn=collate_fn or collate_clips,
        pin_memory=pin_memory,
        drop_last=dataset.train,
        persistent_workers=workers,
        worker_init_fn=_init_worker if workers else None,
        generator=generator,
        timeout=timeout if workers else 0,
    )


class ReplayLoader:
    """An evaluation loader that keeps its batches after the first full pass and replays them.

    Evaluation clips are fixed (set starts, no augmentation), so decoding them again every epoch
    only costs time: at the CPU preset decoding is most of an evaluation pass. Batches are kept
    while their clips fit in `max_bytes`; a set larger than that is read from the loader every
    time, as without this wrapper. Use it for deterministic loaders only.
    """

    def __init__(self, loader: DataLoader, max_bytes: int) -> None:
        self.loader, self.max_bytes = loader, max_bytes
        self.batches: list[dict[str, Any]] | None = None
        self.too_large = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.batches is not None:
            yield from self.batches
            return
        kept: list[dict[str, Any]] | None = None if self.too_large else []
        size = 0
        for batch in self.loader:
            if kept is not None:
                x = batch["clips" if "clips" in batch else "clip"]  # tuple batches too
                size += x.element_size() * x.nelement()
                if size > self.max_bytes:
                    kept, self.too_large = None, True
                else:
                    kept.append(batch)
            yield batch
        self.batches = kept  # reached only when the pass was complete


def _init_worker(worker_id: int) -> None:
    # Workers already run in parallel; intra-op threads per worker would oversubscribe the cores.
    torch.set_num_threads(1)
    # Forked workers inherit numpy's global generator; reseeding keeps any library drawing from it
    # from repeating the same numbers in every worker.
    np.random.seed(torch.initial_seed() % 2**32)
