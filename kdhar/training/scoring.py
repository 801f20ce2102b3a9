"""How a run's model is scored, whatever it learns: the evaluation sets, the per-epoch metrics, the
final report and the logged model's form. The listeners score through one of these, so a task
brings its own without the listeners learning it:

- `ClipEvaluation`: action recognition (clip and video accuracy, `kdhar.engine.evaluate`), the
  default of every objective;
- `kdhar.detector_eval.DetectionEvaluation`: temporal detection (mAP over windows), which
  detection objectives bring (`Objective.evaluation`).

Each has `headline` (the metric stages, best.pt and the champion read, as `test_`/`val_<headline>`),
`stage_prefix` (`<prefix>_early`, ...), `collate` (the batches' collate function, None for clips),
`datasets(splits)`, `score(model, name, loader, device)`, `metrics(prefix, result)`,
`report(result)` -> (final metrics, {file: figure}, {file: data}), `loggable(model)` and `example()`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from kdhar.config import RunConfig
from kdhar.data.dataset import VideoClipDataset
from kdhar.engine import evaluate
from kdhar.plots import confusion_figure


def split_metrics(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    """The logged scores of one evaluation (`kdhar.engine.evaluate`), as <prefix>_<score>."""
    keys = ("clip_top1", "clip_top5", "video_top1", "mean_class_acc", "loss")
    return {f"{prefix}_{k}": float(result[k]) for k in keys if k in result}


class ClipEvaluation:
    """Recognition: test clips (and validation clips) scored for clip and video accuracy."""

    headline = "video_top1"
    stage_prefix = "acc"
    collate = None

    def __init__(self, cfg: RunConfig, classes: list[str]) -> None:
        self.cfg, self.classes = cfg, classes

    def datasets(self, splits: Any) -> dict[str, VideoClipDataset]:
        parts = {"test": splits.test, **({"val": splits.val} if splits.val is not None else {})}
        return {name: VideoClipDataset(index, self.cfg.clip, train=False, on_bad=self.cfg.data.on_bad)
                for name, index in parts.items()}

    def score(self, model: nn.Module, name: str, loader: Any, device: torch.device) -> dict[str, Any]:
        return evaluate(model, loader, device, len(self.classes))

    def metrics(self, prefix: str, result: dict[str, Any]) -> dict[str, float]:
        return split_metrics(prefix, result)

    def report(self, result: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
        figures = {"confusion_matrix.png": confusion_figure(result["confusion"], self.classes)}
        data = {"per_class_report.json": {"per_class": result["per_class"], "classes": self.classes}}
        return split_metrics("final_test", result), figures, data

    def loggable(self, model: nn.Module) -> nn.Module:
        return model

    def example(self) -> np.ndarray:
        clip = self.cfg.clip
        return np.zeros((2, 3, clip.clip_len, clip.crop, clip.crop), dtype=np.float32)
