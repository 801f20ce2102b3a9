"""Temporal action detection without a network: segment overlaps, NMS and soft-NMS, decoding a
detector's per-step outputs over windows into video-level segments, and THUMOS14's mAP. Numpy only,
so a report or a test can score detections without torch.

- `segments.py`: `temporal_iou` (pairwise tIoU of two sets of segments).
- `nms.py`: `soft_nms` (Gaussian decay, as GKD's and AFSD's THUMOS14 code), `nms` (hard suppression).
- `decode.py`: `window_candidates` (one window's steps -> segments in video frames), `decode_video`
  (every window of a video -> its detections in seconds, per-class NMS or soft-NMS, top k),
  `detection_rows` (videos' detections -> the (video, label, start, end, score) rows mAP reads).
- `metrics.py`: `evaluate_detections` (AP per class and tIoU, mAP per tIoU and averaged) under the
  official THUMOS14 protocol or the ActivityNet code GKD's and AFSD's evaluation use.
"""

from kdhar.detection.decode import Detections, decode_video, detection_rows, window_candidates
from kdhar.detection.metrics import (
    PROTOCOLS,
    TIOUS_GKD,
    TIOUS_THUMOS14,
    DetectionScores,
    evaluate_detections,
)
from kdhar.detection.nms import nms, soft_nms
from kdhar.detection.segments import temporal_iou

__all__ = [
    "PROTOCOLS",
    "TIOUS_GKD",
    "TIOUS_THUMOS14",
    "DetectionScores",
    "Detections",
    "decode_video",
    "detection_rows",
    "evaluate_detections",
    "nms",
    "soft_nms",
    "temporal_iou",
    "window_candidates",
]
