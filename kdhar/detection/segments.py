"""Overlap of temporal segments."""

from __future__ import annotations

import numpy as np


def temporal_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """tIoU of every segment of `a` (N, 2) with every segment of `b` (M, 2), as (N, M).

    Intersection over union, where the union of two overlapping segments is the span from the
    earlier start to the later end (THUMOS14's `intervaloverlapvalseconds`, and for overlapping
    segments the same as length + length - intersection). Segments that only touch, or a segment of
    zero length, overlap 0.
    """
    a = np.sort(np.asarray(a, dtype=np.float64).reshape(-1, 2), axis=1)
    b = np.sort(np.asarray(b, dtype=np.float64).reshape(-1, 2), axis=1)
    inter = np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0])
    hull = np.maximum(a[:, None, 1], b[None, :, 1]) - np.minimum(a[:, None, 0], b[None, :, 0])
    out = np.zeros(inter.shape)
    np.divide(inter, hull, out=out, where=inter > 0)
    return out
