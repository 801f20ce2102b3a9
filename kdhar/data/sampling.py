"""Clip sampling: pure index maths on frame numbers (numpy only, no I/O).

A clip is `clip_len` frames taken every `frame_interval` frames, so it spans
`(clip_len - 1) * frame_interval + 1` frames of the video. Videos shorter than that keep every
index inside the video: the tail repeats the last real frame.
"""

from __future__ import annotations

import numpy as np


def clip_span(clip_len: int, frame_interval: int) -> int:
    """Number of video frames one clip covers, first to last sampled frame inclusive."""
    _check_clip(clip_len, frame_interval)
    return (clip_len - 1) * frame_interval + 1


def max_start(num_frames: int, clip_len: int, frame_interval: int) -> int:
    """Last start frame from which a whole clip fits (0 for videos shorter than a clip)."""
    _check_frames(num_frames)
    return max(0, num_frames - clip_span(clip_len, frame_interval))


def train_clip_start(rng: np.random.Generator, num_frames: int, clip_len: int, frame_interval: int) -> int:
    """Draws a start frame uniformly over every start at which the clip fits."""
    return int(rng.integers(0, max_start(num_frames, clip_len, frame_interval) + 1))


def test_clip_starts(num_frames: int, clip_len: int, frame_interval: int, num_clips: int) -> list[int]:
    """Start frames of `num_clips` clips spread evenly from the first to the last valid start.

    One clip is taken from the middle of the video. Short videos give repeated starts rather than
    fewer clips, so every video contributes the same number of eval items.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    last = max_start(num_frames, clip_len, frame_interval)
    if num_clips == 1:
        return [last // 2]
    return [int(s) for s in np.rint(np.linspace(0, last, num_clips))]


def clip_indices(start: int, clip_len: int, frame_interval: int, num_frames: int) -> np.ndarray:
    """Frame numbers of the clip beginning at `start`, clamped to `[0, num_frames - 1]`."""
    _check_clip(clip_len, frame_interval)
    _check_frames(num_frames)
    idx = start + frame_interval * np.arange(clip_len, dtype=np.int64)
    return np.clip(idx, 0, num_frames - 1)


def tuple_starts(
    rng: np.random.Generator,
    num_frames: int,
    clip_len: int,
    frame_interval: int,
    tuple_len: int,
    gap: int = 0,
) -> list[int]:
    """Draws start frames of `tuple_len` clips in temporal order, for clip-order prediction.

    Consecutive clips are `gap` frames apart when the video is long enough; otherwise the clips are
    spread evenly over the video (they then overlap, but keep their order).
    """
    if tuple_len < 1:
        raise ValueError(f"tuple_len must be >= 1, got {tuple_len}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    span = clip_span(clip_len, frame_interval)
    _check_frames(num_frames)
    total = tuple_len * span + (tuple_len - 1) * gap
    if total <= num_frames:
        first = int(rng.integers(0, num_frames - total + 1))
        return [first + k * (span + gap) for k in range(tuple_len)]
    last = max_start(num_frames, clip_len, frame_interval)
    return [int(s) for s in np.floor(np.linspace(0, last, tuple_len))]


def _check_clip(clip_len: int, frame_interval: int) -> None:
    if clip_len < 1 or frame_interval < 1:
        raise ValueError(f"clip_len and frame_interval must be >= 1, got {clip_len} and {frame_interval}")


def _check_frames(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
