"""Clip tuples for PCL's pretext task (VCP, 5-way), as the public PCL code samples them.

A tuple is `tuple_len` clips of `clip_len` consecutive frames from one video (no temporal
subsampling), plus a fourth "remote" clip at least `REMOTE_GAP` frames outside the tuple. The
middle clip carries the pretext label (0 unchanged, 1 rotated, 2 spatially permuted, 3 two
temporal chunks swapped, 4 replaced by the remote clip); `kdhar.data.pretext` applies it.

Two readings of the paper's "interval 8" (`stride`):

- "upstream" (the default, what the PCL code does): clip k starts at start + k * (tuple_len +
  interval), 11 frames apart at clip_len 10, interval 8, tuple_len 3;
- "nominal": clip k starts at start + k * (clip_len + interval), 18 frames apart there.

Either way a video must have at least `span` = clip_len * tuple_len + interval * (tuple_len - 1)
frames (VCOP's rule, which upstream keeps for both): shorter videos are left out of the tuple view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdhar.config import STRIDES

PRETEXT_LABELS = 5  # unchanged, rotation, spatial permutation, chunk swap, remote clip
REMOTE = 4  # the label whose middle clip is replaced by the remote clip
REMOTE_GAP = 16  # frames between the tuple and its remote clip, at least


@dataclass(frozen=True)
class TupleLayout:
    """How the clips of a tuple sit in a video (PCL defaults: the KD paper's clip length 10)."""

    clip_len: int = 10
    interval: int = 8
    tuple_len: int = 3
    stride: str = "upstream"

    def __post_init__(self) -> None:
        if self.stride not in STRIDES:
            raise ValueError(f"clip_stride {self.stride!r}: choose one of {', '.join(STRIDES)}")
        if self.clip_len < 1 or self.interval < 0 or self.tuple_len < 2:
            raise ValueError(f"tuple layout {self}: needs clip_len >= 1, interval >= 0 and tuple_len >= 2")
        size = -(-self.clip_len // 4)  # torch.chunk's chunk size
        if -(-self.clip_len // size) != 4:
            raise ValueError(f"clip_len {self.clip_len}: torch.chunk splits it into {-(-self.clip_len // size)} "
                             "temporal chunks, and the chunk-swap task needs 4 (e.g. 8, 10 or 16 frames)")

    @property
    def span(self) -> int:
        """The fewest frames a video needs for a tuple (and the range tuple starts are drawn from)."""
        return self.clip_len * self.tuple_len + self.interval * (self.tuple_len - 1)

    @property
    def step(self) -> int:
        """Frames from one clip's start to the next one's."""
        return (self.tuple_len if self.stride == "upstream" else self.clip_len) + self.interval

    def starts(self, start: int) -> list[int]:
        """First frame of each clip of the tuple that begins at `start`."""
        return [start + k * self.step for k in range(self.tuple_len)]

    def fits(self, num_frames: int) -> bool:
        return num_frames >= self.span


def diagram(layout: TupleLayout) -> str:
    """Where a tuple's clips sit among the first `span` frames of a video (the tuple drawn at frame
    0), one text row per clip: `#` a frame of the clip, `.` one of none; the README shows it."""
    width = layout.span
    rows = ["frame  " + "".join(str(f % 10) for f in range(width))]
    for k, s in enumerate(layout.starts(0)):
        rows.append(f"clip {k} " + "." * s + "#" * layout.clip_len + "." * (width - s - layout.clip_len)
                    + f"  frames {s}-{s + layout.clip_len - 1}")
    return "\n".join(rows)


@dataclass(frozen=True)
class TupleDraw:
    """One sample's random choices: where its tuple starts, its pretext label and, for label 4,
    where the remote clip starts."""

    start: int
    label: int
    remote: int | None = None

    def clip_starts(self, layout: TupleLayout) -> list[int]:
        """Starts of the tuple's clips followed by the fourth clip's: the remote clip for label 4,
        otherwise a copy of the middle clip (as upstream loads it)."""
        starts = layout.starts(self.start)
        return [*starts, self.remote if self.remote is not None else starts[1]]


def remote_start(rng: np.random.Generator, num_frames: int, start: int, layout: TupleLayout) -> int | None:
    """A clip start at least REMOTE_GAP frames before or after the tuple, each side with probability
    1/2; None unless both sides have room (upstream's rule, which is why label 4 is rarer)."""
    before = start - layout.clip_len - REMOTE_GAP
    after = num_frames - start - layout.span - layout.clip_len - REMOTE_GAP
    if before < 0 or after < 0:
        return None
    if rng.random() < 0.5:
        return int(rng.integers(0, before + 1))
    return int(rng.integers(start + layout.span + REMOTE_GAP, num_frames - layout.clip_len + 1))


def draw_tuple(rng: np.random.Generator, num_frames: int, layout: TupleLayout) -> TupleDraw:
    """The tuple start ~ U{0 .. L - span} and label ~ U{0..4}; a label 4 without room for a remote
    clip is redrawn from U{0..3}.

    Raises:
        ValueError: the video is shorter than `layout.span`.
    """
    if not layout.fits(num_frames):
        raise ValueError(f"a video of {num_frames} frames is shorter than a tuple ({layout.span} frames)")
    start = int(rng.integers(0, num_frames - layout.span + 1))
    label = int(rng.integers(0, PRETEXT_LABELS))
    remote = None
    if label == REMOTE:
        remote = remote_start(rng, num_frames, start, layout)
        if remote is None:
            label = int(rng.integers(0, REMOTE))
    return TupleDraw(start, label, remote)


def clip_indices(draw: TupleDraw, layout: TupleLayout) -> np.ndarray:
    """Frame indices of the four clips, shape (4, clip_len)."""
    return np.asarray([np.arange(s, s + layout.clip_len) for s in draw.clip_starts(layout)], dtype=np.int64)


class TupleClipDataset:
    """PCL samples from the videos of an index: a tuple of `layout.tuple_len` clips, the middle one
    transformed by its pretext label, as items `{"clips": (tuple_len, C, clip_len, H, W), "pretext":
    label, "label": action label, "index": i}`.

    Each clip gets its own augmentation draw (crop, flip, jitter, grayscale, blur), shared by all its
    frames, through the same `draw_params`/`apply_params` as single clips. Training items are drawn
    from `np.random.default_rng([seed, view, i])`; evaluation items from `[seed, i]` only, so their
    starts and labels are fixed (PCL's validation keeps the training augmentations). Videos shorter
    than `layout.span` are left out and counted in `too_short`.

    Args:
        index: the videos.
        clip: resize, crop, augmentation and flip settings (its clip_len is not used: the layout's is).
        layout: the tuple's clip length, interval, tuple length and stride.
        train: per-view draws (training) or fixed ones (validation).
        spatial_perm, swap_pairs: see `kdhar.data.pretext`.
        cache_bytes: as for `VideoClipDataset`.
    """

    def __init__(self, index, clip, layout: TupleLayout, train: bool, seed: int = 0, spatial_perm: str = "fixed",
                 swap_pairs: str = "any", cache_bytes: int = 0) -> None:
        from kdhar.data.dataset import VideoClipDataset
        from kdhar.data.index import DatasetIndex
        from kdhar.data.video import frame_count

        counts = [frame_count(s.path) for s in index.samples]
        kept = [s for s, n in zip(index.samples, counts) if layout.fits(n)]
        self.too_short = len(index.samples) - len(kept)
        self.samples, self.classes = kept, list(index.classes)
        self.layout, self.clip, self.train, self.seed = layout, clip, train, seed
        self.spatial_perm, self.swap_pairs = spatial_perm, swap_pairs
        # Decoding and the frame cache are the single-clip dataset's.
        self._frames = VideoClipDataset(DatasetIndex(samples=kept, classes=self.classes, root=index.root), clip,
                                        train=train, seed=seed, cache_bytes=cache_bytes)
        self.view = 0

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from kdhar.data.transforms import apply_params, draw_params
        from kdhar.data.pretext import transform

        item, view = key if isinstance(key, tuple) else (key, self.view)
        item = int(item)
        rng = np.random.default_rng([self.seed, int(view), item] if self.train else [self.seed, item])
        sample, layout, clip = self.samples[item], self.layout, self.clip
        size = tuple(clip.resize) if clip.resize is not None else None
        draw: list[TupleDraw] = []

        def indices(n: int) -> np.ndarray:
            draw.append(draw_tuple(rng, n, layout))
            return clip_indices(draw[0], layout).reshape(-1)

        frames = self._frames._read(item, sample.path, size, indices)
        extra = layout.tuple_len  # the row of the fourth (remote or copied) clip
        frames = frames.reshape(extra + 1, layout.clip_len, *frames.shape[1:])
        d = draw[0]
        used = [*range(layout.tuple_len), extra] if d.label == REMOTE else range(layout.tuple_len)
        clips = {}
        for k in used:
            params = draw_params(rng, frames.shape[2:4], clip.resize, clip.crop, augment=clip.augment, hflip=clip.hflip)
            clips[k] = apply_params(frames[k], params, clip.normalize)
        middle = clips[extra] if d.label == REMOTE else transform(clips[1], d.label, rng, self.spatial_perm, self.swap_pairs)
        tuple_clips = [clips[0], middle, *[clips[k] for k in range(2, layout.tuple_len)]]
        return {"clips": torch.stack(tuple_clips), "pretext": d.label, "label": sample.label, "index": item}


__all__ = ["TupleClipDataset", "STRIDES", "PRETEXT_LABELS", "REMOTE", "REMOTE_GAP", "TupleLayout", "TupleDraw", "remote_start",
           "draw_tuple", "clip_indices", "diagram"]
