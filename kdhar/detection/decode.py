"""From a detector's per-step outputs over windows to a video's detections.

An anchor-free 1-D detector predicts, at every step t of a window, a score per class and the
distances from the step's centre (t + 0.5) back to the action's start and on to its end, in steps.
Each (step, class) whose score passes a threshold proposes the segment
[t + 0.5 - d_start, t + 0.5 + d_end], which the window's first frame and frames per step place in
the video. Overlapping windows propose the same action several times; `decode_video` pools every
window of a video, clips the segments to the video and suppresses duplicates per class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from kdhar.detection.nms import nms, soft_nms


@dataclass(frozen=True)
class Detections:
    """Segments (N, 2), their scores (N,) and classes (N,), in frames or seconds as the caller says."""

    segments: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, idx: np.ndarray) -> Detections:
        return Detections(self.segments[idx], self.scores[idx], self.labels[idx])

    @staticmethod
    def concat(parts: list[Detections]) -> Detections:
        if not parts:
            return Detections.empty()
        return Detections(np.concatenate([p.segments for p in parts]).reshape(-1, 2),
                          np.concatenate([p.scores for p in parts]),
                          np.concatenate([p.labels for p in parts]).astype(np.int64))


def window_candidates(
    scores: np.ndarray,
    start_dist: np.ndarray,
    end_dist: np.ndarray,
    window_start: int,
    frame_interval: int,
    valid_steps: int | None = None,
    score_threshold: float = 0.001,
) -> Detections:
    """The segments one window proposes, in video frames.

    Args:
        scores: (T, K) class scores (probabilities) per step.
        start_dist, end_dist: (T,) distances in steps from each step's centre to the start and end.
        window_start: the window's first frame.
        frame_interval: frames per step.
        valid_steps: steps inside the video (a short video's window repeats its last frame after them).
        score_threshold: (step, class) pairs scoring below it propose nothing.
    """
    scores = np.asarray(scores, dtype=np.float64)
    steps = scores.shape[0] if valid_steps is None else min(valid_steps, scores.shape[0])
    t, k = np.nonzero(scores[:steps] >= score_threshold)
    centre = t + 0.5
    segs = np.stack([centre - np.asarray(start_dist)[t], centre + np.asarray(end_dist)[t]], axis=1)
    return Detections(segs * frame_interval + window_start, scores[t, k], k.astype(np.int64))


def decode_video(
    candidates: Detections,
    num_frames: int,
    fps: float,
    method: str = "soft",
    sigma: float = 0.5,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.001,
    top_k: int = 200,
) -> Detections:
    """A video's detections in seconds from the candidates of all its windows (in frames).

    Segments are clipped to the video; empty ones are dropped. Each class is suppressed on its own
    (`method` "soft": Gaussian soft-NMS with `sigma`; "hard": NMS at `iou_threshold`), then the
    `top_k` best of all classes are kept, best first.
    """
    if method not in ("soft", "hard"):
        raise ValueError(f"NMS method must be 'soft' or 'hard', got {method!r}")
    segs = np.clip(candidates.segments, 0.0, float(num_frames))
    keep = (segs[:, 1] > segs[:, 0]) & (candidates.scores >= score_threshold)
    pool = Detections(segs[keep], candidates.scores[keep], candidates.labels[keep])
    parts = []
    for label in np.unique(pool.labels):
        cls = pool.take(np.flatnonzero(pool.labels == label))
        if method == "soft":
            idx, new_scores = soft_nms(cls.segments, cls.scores, sigma, score_threshold, top_k)
            parts.append(Detections(cls.segments[idx], new_scores, cls.labels[idx]))
        else:
            parts.append(cls.take(nms(cls.segments, cls.scores, iou_threshold, top_k)))
    found = Detections.concat(parts)
    best = np.argsort(-found.scores, kind="stable")[:top_k]
    return Detections(found.segments[best] / fps, found.scores[best], found.labels[best])


def detection_rows(detections: Mapping[str, Detections]) -> list[tuple[str, int, float, float, float]]:
    """(video, label, start, end, score) rows, the columns of THUMOS14's detection files and of
    `evaluate_detections`, from each video's detections in seconds."""
    return [(video, int(label), float(seg[0]), float(seg[1]), float(score))
            for video, found in detections.items()
            for seg, score, label in zip(found.segments, found.scores, found.labels)]
