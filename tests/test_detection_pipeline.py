"""The detection chain end to end on real synthetic videos: annotations in seconds -> window steps ->
head targets -> proposals in frames -> a video's detections in seconds -> mAP. A detector that
predicts exactly its targets must score a mAP of 1, so every unit conversion on the way is checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdhar.config import ClipConfig, WindowConfig
from kdhar.data import untrimmed
from kdhar.data.thumos14 import load_detection_index
from kdhar.data.window_dataset import WindowDataset
from kdhar.detection import (
    TIOUS_GKD,
    TIOUS_THUMOS14,
    Detections,
    decode_video,
    detection_rows,
    evaluate_detections,
    window_candidates,
)
from kdhar.objectives.detection import head_targets

SPEC = untrimmed.UntrimmedSpec(num_classes=3, groups=2, videos_per_group=2, frames=(60, 80), segments=(1, 3),
                               segment_frames=(10, 16), ambiguous=0.5, size=(32, 64), seed=8)
WINDOW = WindowConfig(length=32, train_stride=8, test_stride=8, frame_interval=1)
STRIDE = 2  # head steps of two window steps, as tiny3d's middle tap


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pipeline")
    untrimmed.generate(root, SPEC)
    return load_detection_index(root, "test")


def oracle_outputs(item: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and distances a perfect head would give: its targets, scoring a segment cut by the
    window's edge lower than one the window holds whole."""
    steps = WINDOW.length // STRIDE
    t = head_targets(item["segments"], item["labels"], item["ambiguous"], item["valid_steps"], steps, STRIDE,
                     num_classes)
    whole = torch.tensor([0.0 < s[0] and s[1] < WINDOW.length for s in item["segments"].tolist()] or [False])
    centre = (torch.arange(steps) + 0.5) * STRIDE
    scores = t.classes.clone()
    for k in torch.nonzero(t.positive).flatten():
        start = centre[k] - t.distances[k, 0] * STRIDE
        seg = int(torch.argmin((item["segments"][:, 0] - start).abs()))
        scores[k] *= 1.0 if whole[seg] else 0.5
    return scores.numpy(), t.distances.numpy()


@pytest.mark.parametrize("method", ["hard", "soft"])
def test_a_detector_predicting_its_targets_scores_a_map_of_one(index, method) -> None:
    data = WindowDataset(index, ClipConfig(resize=(32, 64), crop=32, augment=False), WINDOW, train=False)
    pooled: dict[int, list[Detections]] = {}
    for i in range(len(data)):
        item = data[i]
        scores, distances = oracle_outputs(item, len(index.classes))
        pooled.setdefault(item["video"], []).append(window_candidates(
            scores, distances[:, 0], distances[:, 1], item["start"], WINDOW.frame_interval * STRIDE,
            score_threshold=0.1))
    found = {}
    for v, parts in pooled.items():
        timeline = data.timelines[v]
        found[data.videos[v].name] = decode_video(Detections.concat(parts), timeline.num_frames, timeline.fps, method)
    truth, ambiguous = index.ground_truth()
    assert sum(len(rows) for rows in truth.values()) >= 4
    rows = detection_rows(found)
    for protocol in ("thumos14", "anet"):
        scores = evaluate_detections(truth, rows, index.classes, TIOUS_THUMOS14 + TIOUS_GKD, ambiguous, protocol)
        assert np.allclose(scores.mean_ap, 1.0), (protocol, scores.ap)
    # Each annotated segment is found as it is, to a millisecond.
    for video, segs in truth.items():
        for label, start, end in segs:
            mine = found[video]
            assert any(np.allclose(s, (start, end), atol=1e-3) for s in mine.segments[mine.labels == label])
