"""Scoring a temporal detector: its outputs on every test window of a subset decoded into each
video's detections and scored as THUMOS14 is, in the two readings people quote.

- `map_*`: the official THUMOS14 toolkit's rules at tIoU 0.3-0.7 (THUMOS14's usual reading);
  `map_avg` is their mean.
- `gkd_map_*`: the ActivityNet code GKD's (and AFSD's) evaluation uses, at tIoU 0.1-0.5;
  `gkd_map_avg` is what GKD's eval.py averages.

`DetectionEvaluation` is what a detection run's listeners score with (the counterpart of the
clip-accuracy evaluation of recognition runs): the evaluation windows of the test and validation
videos, per-epoch mAPs, and at the end the per-class APs, a few predicted-vs-true timelines and the
AP table. `score_windows` alone scores any module returning a detector's outputs (a logged model
too, through `kdhar.models.detector.split_outputs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kdhar.config import ClipConfig, DetectionConfig, WindowConfig
from kdhar.data.thumos14 import DetectionIndex
from kdhar.data.window_dataset import WindowDataset, collate_windows
from kdhar.detection import (TIOUS_GKD, TIOUS_THUMOS14, DetectionScores, Detections, decode_video, detection_rows,
                             evaluate_detections, window_candidates)
from kdhar.models.detector import DetectorOutputs, split_outputs
from kdhar.plots import timelines_figure

TIMELINE_VIDEOS = 4  # videos drawn in a run's timelines figure


@dataclass
class DetectionResult:
    """A subset scored: THUMOS14's reading, GKD's reading, and each video's detections (seconds)."""

    official: DetectionScores
    gkd: DetectionScores
    detections: dict[str, Detections]
    index: DetectionIndex

    def metrics(self, prefix: str, per_class: bool = False) -> dict[str, float]:
        """`<prefix>_map_<tIoU>`, `<prefix>_map_avg` and the `gkd_` ones; with `per_class` also each
        class's AP (`<prefix>_ap_<tIoU>_<Class>`, `<prefix>_gkd_ap_...`)."""
        out = {}
        for name, scores in (("", self.official), ("gkd_", self.gkd)):
            found = scores.metrics(f"{prefix}_{name}")
            out.update({k: v for k, v in found.items() if per_class or f"{prefix}_{name}map_" in k})
        return out


@torch.inference_mode()
def window_detections(model: nn.Module, loader: Any, data: WindowDataset, device: torch.device,
                      det: DetectionConfig) -> dict[str, Detections]:
    """Each video's detections in seconds: every window's proposals pooled per video, then clipped
    to the video, suppressed per class (soft-NMS or NMS) and cut to the best `det.top_k`."""
    model.eval()
    pooled: dict[int, list[Detections]] = {v: [] for v in range(len(data.videos))}
    for batch in loader:
        x = batch["clip"].to(device)
        out = model(x)
        if isinstance(out, torch.Tensor):  # a logged model's single tensor
            out = split_outputs(out, x.shape[2])
        scores = torch.sigmoid(out["logits"].float()).cpu().numpy()
        distances = out["distances"].float().cpu().numpy()
        frames_per_step = data.window.frame_interval * out["stride"]
        for i in range(x.shape[0]):
            valid = math.ceil(int(batch["valid_steps"][i]) / out["stride"])
            pooled[int(batch["video"][i])].append(window_candidates(
                scores[i], distances[i, :, 0], distances[i, :, 1], int(batch["start"][i]), frames_per_step, valid,
                det.score_threshold))
    found = {}
    for v, parts in pooled.items():
        timeline = data.timelines[v]
        found[data.videos[v].name] = decode_video(
            Detections.concat(parts), timeline.num_frames, timeline.fps, det.nms, sigma=det.sigma,
            iou_threshold=det.iou_threshold, score_threshold=det.score_threshold, top_k=det.top_k)
    return found


def score_detections(index: DetectionIndex, detections: dict[str, Detections]) -> DetectionResult:
    """Both readings of a subset's detections against its annotations."""
    truth, ambiguous = index.ground_truth()
    rows = detection_rows(detections)
    return DetectionResult(
        official=evaluate_detections(truth, rows, index.classes, TIOUS_THUMOS14, ambiguous, "thumos14"),
        gkd=evaluate_detections(truth, rows, index.classes, TIOUS_GKD, None, "anet"),
        detections=detections, index=index,
    )


def timelines(result: DetectionResult, data: WindowDataset, videos: int = TIMELINE_VIDEOS) -> Any:
    """Predicted against true segments of the first `videos` videos: each video's best detections,
    twice as many as it has segments (at least 3)."""
    panels = []
    for v, video in list(enumerate(data.videos))[:videos]:
        found = result.detections.get(video.name, Detections.empty())
        keep = max(3, 2 * len(video.segments))
        predicted = [(int(lab), float(seg[0]), float(seg[1]), float(score))
                     for seg, score, lab in list(zip(found.segments, found.scores, found.labels))[:keep]]
        timeline = data.timelines[v]
        panels.append({"name": video.name, "duration": timeline.num_frames / timeline.fps,
                       "truth": [(s.label, s.start, s.end) for s in video.segments], "predicted": predicted})
    return timelines_figure(panels, result.index.classes)


def ap_table(result: DetectionResult) -> dict[str, Any]:
    """The per-class AP of both readings as plain data (a run's `per_class_ap.json`)."""
    def table(scores: DetectionScores) -> dict[str, Any]:
        return {"protocol": scores.protocol, "tious": list(scores.tious),
                "ap": {c: [None if np.isnan(v) else float(v) for v in row] for c, row in zip(scores.classes, scores.ap)},
                "map": [float(m) for m in scores.mean_ap]}

    return {"thumos14": table(result.official), "gkd": table(result.gkd)}


class DetectionEvaluation:
    """How a detection run is scored (the listeners' side): evaluation windows of the test and
    validation videos, their mAPs each epoch, and the final per-class APs, timelines and AP table.

    Args:
        clip: resize and crop of the windows.
        window: window length, strides and frames per step.
        det: decoding (NMS, its threshold and top k).
    """

    headline = "map_avg"  # the metric stages, the champion and best.pt read (`test_`/`val_` prefixed)
    stage_prefix = "map"  # map_early, map_mid, map_late
    collate = staticmethod(collate_windows)

    def __init__(self, clip: ClipConfig, window: WindowConfig, det: DetectionConfig) -> None:
        self.clip, self.window, self.det = clip, window, det
        self.sets: dict[str, WindowDataset] = {}

    def datasets(self, splits: Any) -> dict[str, WindowDataset]:
        """The test windows and, when the run holds validation videos out, the validation ones."""
        parts = {"test": splits.test, **({"val": splits.val} if splits.val is not None else {})}
        self.sets = {name: WindowDataset(index, self.clip, self.window, train=False) for name, index in parts.items()}
        return self.sets

    def score(self, model: nn.Module, name: str, loader: Any, device: torch.device) -> DetectionResult:
        data = self.sets[name]
        return score_detections(data.index, window_detections(model, loader, data, device, self.det))

    def metrics(self, prefix: str, result: DetectionResult) -> dict[str, float]:
        return result.metrics(prefix)

    def report(self, result: DetectionResult) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
        """(final metrics with per-class APs, {file: figure}, {file: plain data}) of the test scores."""
        figures = {"timelines.png": timelines(result, self.sets["test"])}
        return result.metrics("final_test", per_class=True), figures, {"per_class_ap.json": ap_table(result)}

    def loggable(self, model: nn.Module) -> nn.Module:
        return DetectorOutputs(model)

    def example(self) -> np.ndarray:
        return np.zeros((2, 3, self.window.length, self.clip.crop, self.clip.crop), dtype=np.float32)
