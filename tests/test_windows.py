"""Windows over untrimmed videos: test windows cover every frame, a window's targets are its segments
in its own steps, and the window dataset reads real videos."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kdhar.config import ClipConfig, WindowConfig
from kdhar.data import untrimmed
from kdhar.data.dataset import make_loader
from kdhar.data.thumos14 import load_detection_index
from kdhar.data.transforms import apply_params, draw_params
from kdhar.data.video import read_frames
from kdhar.data.window_dataset import WindowDataset, collate_windows
from kdhar.data.windows import to_frames, to_steps, window_indices, window_starts, window_targets


def test_windows_cover_every_frame() -> None:
    for num_frames, length, stride, interval in itertools.product(
            [1, 7, 64, 255, 256, 257, 600, 1001], [1, 16, 64], [1, 5, 30, 64], [1, 3]):
        extent = length * interval
        if stride > extent:
            with pytest.raises(ValueError, match="leaves frames out"):
                window_starts(num_frames, length, stride, interval)
            continue
        starts = window_starts(num_frames, length, stride, interval)
        covered = np.zeros(num_frames, bool)
        for s in starts:
            covered[s: s + extent] = True
            assert 0 <= s and (s + extent <= num_frames or s == 0)  # inside the video unless it is short
        assert covered.all(), (num_frames, length, stride, interval)
        assert starts == sorted(set(starts)) and starts[0] == 0
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_starts_step_by_the_stride_and_meet_the_end() -> None:
    assert window_starts(600, 256, 128) == [0, 128, 256, 344]
    assert window_starts(512, 256, 128) == [0, 128, 256]
    assert window_starts(100, 256, 30) == [0]
    assert window_starts(700, 64, 128, frame_interval=4) == [0, 128, 256, 384, 444]
    assert window_indices(444, 64, 4, 700)[[0, -1]].tolist() == [444, 696]
    assert window_indices(0, 8, 3, 10).tolist() == [0, 3, 6, 9, 9, 9, 9, 9]  # a short video repeats its end


def test_targets_are_the_segments_in_window_steps() -> None:
    segments = np.array([[10.0, 50.0], [240.0, 300.0], [400.0, 420.0]])
    targets = window_targets(segments, np.array([2, 0, 1]), np.array([[60.0, 70.0]]), start=0, length=64,
                             frame_interval=4, num_frames=200)
    # The second lies 16/60 in the window (< half): dropped; the third lies outside.
    assert targets.segments.tolist() == [[2.5, 12.5]] and targets.labels.tolist() == [2]
    assert targets.ambiguous.tolist() == [[15.0, 17.5]]
    assert targets.valid_steps == 50  # 200 frames of 4 per step

    shifted = window_targets(segments, np.array([2, 0, 1]), np.zeros((0, 2)), start=200, length=64,
                             frame_interval=4, num_frames=450, min_inside=0.25)
    assert shifted.segments.tolist() == [[10.0, 25.0], [50.0, 55.0]] and shifted.labels.tolist() == [0, 1]
    assert shifted.valid_steps == 63  # frames 200..449: ceil(250 / 4)
    assert np.allclose(to_frames(to_steps(segments, 37, 3), 37, 3), segments)


SPEC = untrimmed.UntrimmedSpec(num_classes=3, groups=2, videos_per_group=2, frames=(70, 90), segments=(1, 2),
                               segment_frames=(10, 16), size=(32, 64), seed=5)
CLIP = ClipConfig(resize=(32, 48), crop=32, augment=True, hflip=False)
WINDOW = WindowConfig(length=12, train_stride=10, test_stride=20, frame_interval=2)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("windows")
    untrimmed.generate(root, SPEC)
    return load_detection_index(root, "train")


def test_eval_windows_cover_every_frame_and_carry_every_segment(index) -> None:
    data = WindowDataset(index, CLIP, WINDOW, train=False)
    for v, timeline in enumerate(data.timelines):
        covered = np.zeros(timeline.num_frames, bool)
        for video, start in data.items:
            if video == v:
                covered[start: start + 24] = True
        assert covered.all()
    item = data[0]
    assert item["clip"].shape == (3, 12, 32, 32) and item["start"] == 0 and item["video"] == 0
    timeline = data.timelines[0]
    seen = to_frames(item["segments"].numpy(), 0, 2)
    expected = np.clip(timeline.segments, 0, 24)
    expected = expected[expected[:, 1] > expected[:, 0]]
    assert np.allclose(seen, expected, atol=1e-4)
    # The clip is the window's frames, resized and centre-cropped.
    frames = read_frames(data.videos[0].path, window_indices(0, 12, 2, timeline.num_frames), size=(32, 48))
    plain = apply_params(frames, draw_params(None, frames.shape[1:3], (32, 48), 32, augment=False))
    assert torch.equal(item["clip"], plain)


def test_training_windows_hold_a_segment_and_replay_their_view(index) -> None:
    data = WindowDataset(index, CLIP, WINDOW, train=True, seed=1)
    assert len(data) > 0 and all(len(data[i]["labels"]) for i in range(len(data)))
    assert torch.equal(data[(0, 3)]["clip"], data[(0, 3)]["clip"])
    assert not torch.equal(data[(0, 3)]["clip"], data[(0, 4)]["clip"])
    with_empty = WindowDataset(index, CLIP, WindowConfig(length=12, train_stride=10, test_stride=20,
                                                         frame_interval=2, train_empty=True), train=True)
    assert len(with_empty) > len(data)


def test_the_loader_batches_windows_with_ragged_segments(index) -> None:
    data = WindowDataset(index, CLIP, WINDOW, train=False)
    batch = next(iter(make_loader(data, batch_size=3, shuffle=False, num_workers=0, collate_fn=collate_windows)))
    assert batch["clip"].shape == (3, 3, 12, 32, 32)
    assert batch["start"].tolist() == [s for _, s in data.items[:3]]
    assert len(batch["segments"]) == 3 and all(s.shape[1] == 2 for s in batch["segments"])
