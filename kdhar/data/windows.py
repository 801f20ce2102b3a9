"""Windows over untrimmed videos: pure index maths on frame numbers (numpy only, no I/O).

A window is `length` frames taken every `frame_interval` frames from its start frame `s`; its step t
stands for frames [s + t·i, s + (t + 1)·i), so the window covers `extent = length · i` frames
[s, s + extent). A detector sees one window at a time and predicts per step; positions in a window
are in steps (floats), positions in a video in frames.

Test windows start every `stride` frames from 0, and one more window is aligned to the video's end
when the last regular one stops short of it: every frame of the video lies in at least one window.
A video shorter than one window gets a single window at 0, whose steps past the end repeat the last
frame and are marked invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowTargets:
    """The segments of one window, in its steps: (M, 2) start/end clipped to the window, their
    labels (M,), the Ambiguous spans (A, 2), and how many steps lie inside the video."""

    segments: np.ndarray
    labels: np.ndarray
    ambiguous: np.ndarray
    valid_steps: int


def window_extent(length: int, frame_interval: int) -> int:
    """Frames one window covers: `length` steps of `frame_interval` frames."""
    if length < 1 or frame_interval < 1:
        raise ValueError(f"window length and frame_interval must be >= 1, got {length} and {frame_interval}")
    return length * frame_interval


def window_starts(num_frames: int, length: int, stride: int, frame_interval: int = 1) -> list[int]:
    """Start frames of windows that together cover every frame of a `num_frames` video.

    Raises:
        ValueError: `stride` is not positive or larger than a window (frames would fall between windows).
    """
    extent = window_extent(length, frame_interval)
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if not 1 <= stride <= extent:
        raise ValueError(
            f"window stride {stride} must be between 1 and the window's {extent} frames "
            f"({length} x {frame_interval}); a larger stride leaves frames out of every window"
        )
    last = max(0, num_frames - extent)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def window_indices(start: int, length: int, frame_interval: int, num_frames: int) -> np.ndarray:
    """Frame numbers of the window's steps, clamped to the video (a short video repeats its last frame)."""
    window_extent(length, frame_interval)
    idx = start + frame_interval * np.arange(length, dtype=np.int64)
    return np.clip(idx, 0, num_frames - 1)


def to_steps(frames: np.ndarray, start: int, frame_interval: int) -> np.ndarray:
    """Video frame positions -> positions in the steps of the window starting at `start`."""
    return (np.asarray(frames, dtype=np.float64) - start) / frame_interval


def to_frames(steps: np.ndarray, start: int, frame_interval: int) -> np.ndarray:
    """Positions in a window's steps -> video frame positions (the inverse of `to_steps`)."""
    return np.asarray(steps, dtype=np.float64) * frame_interval + start


def window_targets(
    segments: np.ndarray,
    labels: np.ndarray,
    ambiguous: np.ndarray,
    start: int,
    length: int,
    frame_interval: int,
    num_frames: int,
    min_inside: float = 0.5,
) -> WindowTargets:
    """The segments a window learns from, in its steps.

    Args:
        segments: (M, 2) start and end frames (floats: seconds times fps) of the video's segments.
        labels: (M,) their classes.
        ambiguous: (A, 2) Ambiguous spans in frames.
        start: the window's first frame.
        length, frame_interval: the window's steps and frames per step.
        num_frames: the video's length, for the count of valid steps.
        min_inside: keep a segment when at least this share of it lies in the window (then clipped
            to it); a segment mostly outside would teach boundaries the window cannot see.
    """
    extent = window_extent(length, frame_interval)
    segs = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
    inside = np.clip(segs, start, start + extent)
    span = segs[:, 1] - segs[:, 0]
    kept = (inside[:, 1] - inside[:, 0]) >= min_inside * np.maximum(span, 1e-9)
    kept &= inside[:, 1] > inside[:, 0]
    amb = np.clip(np.asarray(ambiguous, dtype=np.float64).reshape(-1, 2), start, start + extent)
    amb = amb[amb[:, 1] > amb[:, 0]]
    valid = int(min(length, -(-(num_frames - start) // frame_interval)))
    return WindowTargets(
        segments=to_steps(inside[kept], start, frame_interval),
        labels=np.asarray(labels, dtype=np.int64).reshape(-1)[kept],
        ambiguous=to_steps(amb, start, frame_interval),
        valid_steps=valid,
    )
