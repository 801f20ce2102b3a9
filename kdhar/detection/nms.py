"""Non-maximum suppression of temporal segments: hard NMS and Gaussian soft-NMS.

A detector that predicts at every step of overlapping windows proposes the same action many times.
Hard NMS keeps the best and drops every other proposal overlapping it by more than a threshold;
soft-NMS (Bodla et al., 2017) instead lowers their scores by exp(-tIoU² / σ), so a second action
close to the first survives with a lower score and the AP curve is not cut short. GKD's detection
code (after AFSD) decodes THUMOS14 with the soft one.
"""

from __future__ import annotations

import numpy as np

from kdhar.detection.segments import temporal_iou


def soft_nms(
    segments: np.ndarray,
    scores: np.ndarray,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    top_k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian soft-NMS.

    Repeatedly takes the highest-scoring remaining segment and multiplies the scores of all others
    by exp(-tIoU² / sigma); segments whose score falls below `score_threshold` are dropped.

    Args:
        segments: (N, 2) start and end.
        scores: (N,) scores.
        sigma: the width of the decay; smaller suppresses harder.
        score_threshold: scores below it are dropped, before and during the suppression.
        top_k: stop after this many segments (all when None).

    Returns:
        (indices into `segments` in the order taken, their decayed scores).
    """
    if sigma <= 0:
        raise ValueError(f"soft-NMS sigma must be positive, got {sigma}")
    segs = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
    live = np.asarray(scores, dtype=np.float64).copy()
    remaining = np.flatnonzero(live >= score_threshold)
    kept, kept_scores = [], []
    while remaining.size and (top_k is None or len(kept) < top_k):
        best = remaining[np.argmax(live[remaining])]  # the first of equal scores
        kept.append(best)
        kept_scores.append(live[best])
        remaining = remaining[remaining != best]
        if remaining.size:
            iou = temporal_iou(segs[best], segs[remaining])[0]
            live[remaining] *= np.exp(-(iou**2) / sigma)
            remaining = remaining[live[remaining] >= score_threshold]
    return np.array(kept, dtype=np.int64), np.array(kept_scores, dtype=np.float64)


def nms(segments: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5, top_k: int | None = None) -> np.ndarray:
    """Hard NMS: indices of the kept segments, best first; a segment is dropped when its tIoU with a
    kept, better one exceeds `iou_threshold`."""
    segs = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    kept: list[int] = []
    while order.size and (top_k is None or len(kept) < top_k):
        best = order[0]
        kept.append(best)
        iou = temporal_iou(segs[best], segs[order[1:]])[0]
        order = order[1:][iou <= iou_threshold]
    return np.array(kept, dtype=np.int64)
