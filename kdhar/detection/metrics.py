"""Mean average precision of temporal detections, as THUMOS14's evaluation computes it.

Two protocols, because the numbers people quote for THUMOS14 come from two different codes:

- ``"thumos14"``: the official THUMOS14 toolkit (TH14evalDet.m with TH14eventdetpr.m). Per class and
  over all videos of the subset: in each video the class's detections are sorted by score, and each
  ground-truth segment in turn takes the still unmatched detection it overlaps most, if that tIoU is
  *greater than* the threshold. An unmatched detection overlapping an Ambiguous segment at all is
  neither a true nor a false positive. AP is the 11-point interpolated average of precision at
  recall 0, 0.1, ..., 1 (the largest precision at a recall at least that), the points spaced as
  MATLAB's `0:0.1:1` computes them (so the fourth is 0.30000000000000004 and a recall of exactly
  0.3 does not reach it). At tied scores true positives rank first, as in the toolkit's list.
- ``"anet"``: the ActivityNet detection code that GKD's and AFSD's THUMOS14 evaluation use
  (compute_average_precision_detection). All detections of a class are sorted by score; each, best
  first, takes the unmatched ground truth of its video it overlaps most, if that tIoU is at least
  the threshold. AP is VOC's all-point interpolated area under the precision envelope. Ambiguous
  segments play no part, and detections in videos outside the ground truth's video list are dropped
  (they are false positives in the toolkit). Scores are ranked with numpy's `argsort()[::-1]` as
  there, so tied scores come out in the same order when the detections are given in the same order.

Either way a class's AP uses every ground truth of the class in the subset (a video with no
detection of it lowers recall), and the mAP at a threshold is the mean over the classes that have
ground truth (a class absent from the subset gets NaN instead of the toolkit's assertion failure).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kdhar.detection.segments import temporal_iou

TIOUS_THUMOS14 = (0.3, 0.4, 0.5, 0.6, 0.7)  # THUMOS14's usual reading
TIOUS_GKD = (0.1, 0.2, 0.3, 0.4, 0.5)  # what GKD's detection eval.py averages
PROTOCOLS = ("thumos14", "anet")


def _matlab_recall_points() -> np.ndarray:
    # MATLAB's colon operator builds a:d:b from both ends (Moler, "How the colon operator works"):
    # the first half as a + k*d, the second as b - (n - k)*d, the middle as (a + b) / 2.
    n = 10
    first = [k * 0.1 for k in range(n // 2)]
    last = [1.0 - (n - k) * 0.1 for k in range(n // 2 + 1, n + 1)]
    return np.array(first + [0.5] + last)


RECALL_POINTS = _matlab_recall_points()

# video -> (label, start, end) for ground truth; video -> (start, end) for Ambiguous spans;
# (video, label, start, end, score) for a detection, the columns of the toolkit's detection file.
GroundTruth = Mapping[str, Sequence[tuple[int, float, float]]]
Ambiguous = Mapping[str, Sequence[tuple[float, float]]]
Detection = tuple[str, int, float, float, float]


@dataclass(frozen=True)
class DetectionScores:
    """AP per class (rows, NaN for a class without ground truth) and tIoU threshold (columns)."""

    classes: list[str]
    tious: tuple[float, ...]
    ap: np.ndarray
    protocol: str

    @property
    def mean_ap(self) -> np.ndarray:
        """mAP at each threshold: the mean over the classes that have ground truth."""
        rows = self.ap[~np.isnan(self.ap).all(axis=1)]
        return rows.mean(axis=0) if len(rows) else np.full(len(self.tious), np.nan)

    @property
    def average(self) -> float:
        """The mAP averaged over the thresholds ("average mAP")."""
        return float(self.mean_ap.mean())

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat names for a tracker: `map_0.5`, `map_avg`, `ap_0.5_<Class>` (classes with ground truth)."""
        out = {f"{prefix}map_{t:g}": float(m) for t, m in zip(self.tious, self.mean_ap)}
        out[f"{prefix}map_avg"] = self.average
        for name, row in zip(self.classes, self.ap):
            if not np.isnan(row).all():
                out.update({f"{prefix}ap_{t:g}_{name}": float(v) for t, v in zip(self.tious, row)})
        return out


def evaluate_detections(
    ground_truth: GroundTruth,
    detections: Iterable[Detection],
    classes: Sequence[str],
    tious: Sequence[float] = TIOUS_THUMOS14,
    ambiguous: Ambiguous | None = None,
    protocol: str = "thumos14",
) -> DetectionScores:
    """AP of every class at every tIoU threshold.

    Args:
        ground_truth: each video's segments (label, start, end); every video of the subset, those
            without a segment too (an empty list).
        detections: (video, label, start, end, score) tuples.
        classes: class names by label.
        tious: the tIoU thresholds.
        ambiguous: each video's Ambiguous spans (the "thumos14" protocol's only).
        protocol: "thumos14" (the official toolkit) or "anet" (GKD's and AFSD's evaluation).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    gt = _by_class_and_video(((v, *row) for v, rows in ground_truth.items() for row in rows), len(classes))
    if protocol == "anet":
        detections = (d for d in detections if d[0] in ground_truth)
    dets = _by_class_and_video(detections, len(classes))
    amb = {v: np.asarray(spans, dtype=np.float64).reshape(-1, 2) for v, spans in (ambiguous or {}).items()}
    ap = np.full((len(classes), len(tious)), np.nan)
    for label in range(len(classes)):
        npos = sum(len(segs) for segs, _, _ in gt[label].values())
        if npos == 0:
            continue
        for j, threshold in enumerate(tious):
            if protocol == "thumos14":
                ap[label, j] = _toolkit_ap(gt[label], dets[label], amb, npos, threshold)
            else:
                ap[label, j] = _anet_ap(gt[label], dets[label], npos, threshold)
    return DetectionScores(list(classes), tuple(tious), ap, protocol)


def _by_class_and_video(rows: Iterable[tuple], num_classes: int) -> list[dict[str, tuple[np.ndarray, ...]]]:
    """Per class: video -> (segments (N, 2), scores (N,), positions in `rows` (N,)); ground truth scores 1."""
    grouped: list[dict[str, list]] = [{} for _ in range(num_classes)]
    for n, row in enumerate(rows):
        video, label, start, end = row[:4]
        if not 0 <= int(label) < num_classes:
            raise ValueError(f"detection or ground truth label {label} of video {video} is not a class 0-{num_classes - 1}")
        grouped[int(label)].setdefault(video, []).append((start, end, row[4] if len(row) > 4 else 1.0, n))
    return [{v: (np.array([r[:2] for r in rs], dtype=np.float64), np.array([r[2] for r in rs], dtype=np.float64),
                 np.array([r[3] for r in rs])) for v, rs in by_video.items()} for by_video in grouped]


def _toolkit_ap(gt, dets, amb, npos: int, threshold: float) -> float:
    """TH14eventdetpr: per-video matching of each ground truth to its best free detection."""
    tp_conf, fp_conf = [], []
    for video, (segs, conf, _) in dets.items():
        order = np.argsort(-conf, kind="stable")  # MATLAB's sort is stable
        segs, conf = segs[order], conf[order]
        free = np.ones(len(conf), bool)
        if video in gt:
            overlap = temporal_iou(gt[video][0], segs)
            for row in overlap:
                idx = np.flatnonzero(free)
                if idx.size and row[idx].max() > threshold:
                    free[idx[np.argmax(row[idx])]] = False
        near_ambiguous = np.zeros(len(conf), bool)
        if video in amb and len(amb[video]):
            near_ambiguous = temporal_iou(amb[video], segs).sum(axis=0) > 0
        tp_conf.append(conf[~free])
        fp_conf.append(conf[free & ~near_ambiguous])
    tp_conf = np.concatenate(tp_conf) if tp_conf else np.zeros(0)
    if tp_conf.size == 0:
        return 0.0
    conf = np.concatenate([tp_conf, *fp_conf])
    is_tp = np.arange(conf.size) < tp_conf.size
    ranked = is_tp[np.argsort(-conf, kind="stable")]
    tp, fp = np.cumsum(ranked), np.cumsum(~ranked)
    recall, precision = tp / npos, tp / (tp + fp)
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in RECALL_POINTS]))


def _anet_ap(gt, dets, npos: int, threshold: float) -> float:
    """compute_average_precision_detection: greedy matching by score over all videos."""
    # The class's detections in the order given, as the evaluator's table holds them.
    rows = sorted(((video, i) for video, (_, _, given) in dets.items() for i in range(len(given))),
                  key=lambda vi: dets[vi[0]][2][vi[1]])
    if not rows:
        return 0.0
    scores = np.array([dets[v][1][i] for v, i in rows])
    locked = {video: np.zeros(len(segs), bool) for video, (segs, _, _) in gt.items()}
    hits = np.zeros(len(rows), bool)
    for rank, k in enumerate(np.argsort(scores)[::-1]):
        video, i = rows[k]
        if video not in gt:
            continue
        tiou = _anet_tiou(dets[video][0][i], gt[video][0])
        for j in np.argsort(tiou)[::-1]:  # best overlap first, as the ActivityNet code orders them
            if tiou[j] < threshold:
                break
            if not locked[video][j]:
                locked[video][j] = hits[rank] = True
                break
    tp = np.cumsum(hits)
    recall, precision = tp / npos, tp / np.arange(1, len(hits) + 1)
    return _voc_ap(precision, recall)


def _anet_tiou(segment: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    # The ActivityNet code's own arithmetic (length + length - intersection), so that a tIoU at a
    # threshold compares as it does there.
    inter = (np.minimum(segment[1], candidates[:, 1]) - np.maximum(segment[0], candidates[:, 0])).clip(0)
    union = (candidates[:, 1] - candidates[:, 0]) + (segment[1] - segment[0]) - inter
    return inter.astype(float) / union


def _voc_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision envelope (VOC 2011's interpolated AP), as `interpolated_prec_rec`."""
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    idx = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))
