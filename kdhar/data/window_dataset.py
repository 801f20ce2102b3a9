"""Torch dataset of windows cut from untrimmed videos, with each window's segments in its steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdhar.config import ClipConfig, WindowConfig
from kdhar.data import windows
from kdhar.data.thumos14 import DetectionIndex, UntrimmedVideo
from kdhar.data.transforms import apply_params, draw_params
from kdhar.data.video import VideoFile, video_info


@dataclass(frozen=True)
class VideoTimeline:
    """A video's length in frames, its frame rate, and its segments and Ambiguous spans in frames."""

    num_frames: int
    fps: float
    segments: np.ndarray  # (M, 2) start, end frames
    labels: np.ndarray  # (M,)
    ambiguous: np.ndarray  # (A, 2) frames


def video_timeline(video: UntrimmedVideo, num_frames: int, fps: float) -> VideoTimeline:
    """The annotations of `video` (seconds) as frame positions at `fps`."""
    segs = np.array([(s.start, s.end) for s in video.segments], dtype=np.float64).reshape(-1, 2) * fps
    labels = np.array([s.label for s in video.segments], dtype=np.int64)
    amb = np.array(video.ambiguous, dtype=np.float64).reshape(-1, 2) * fps
    return VideoTimeline(num_frames, fps, segs, labels, amb)


class WindowDataset(Dataset):
    """Windows of the videos of a detection index.

    Training: windows every `window.train_stride` frames that hold at least one segment (all of them
    with `window.train_empty`), each with a random augmentation drawn from
    `np.random.default_rng([seed, view, item])`, where `view` is the epoch as in `VideoClipDataset`.
    Evaluation: windows every `window.test_stride` frames plus one at the end, covering every frame,
    unaugmented.

    Items are dicts: `clip` float (C, L, H, W); `segments` float (M, 2) and `labels` long (M,) in the
    window's steps; `ambiguous` float (A, 2); `valid_steps` (steps inside the video); `video` (its
    position in the index); `start` (the window's first frame); `index` (the window's position).

    Args:
        index: the videos and their annotations.
        clip: resize, crop, augment and hflip (clip length and interval come from `window`).
        window: length, strides, frames per step, which segments a training window keeps.
        train: training or evaluation windows.
        seed: base seed of every random draw.
        info: (frames, fps) of each video, in index order; read from the files when None.
    """

    def __init__(
        self,
        index: DetectionIndex,
        clip: ClipConfig,
        window: WindowConfig,
        train: bool,
        seed: int = 0,
        info: list[tuple[int, float]] | None = None,
    ) -> None:
        info = info if info is not None else [video_info(v.path) for v in index.videos]
        self.index = index
        self.videos = list(index.videos)
        self.timelines = [video_timeline(v, n, fps) for v, (n, fps) in zip(self.videos, info)]
        self.clip, self.window, self.train, self.seed = clip, window, train, seed
        self.view = 0
        self.items = [(v, s) for v, timeline in enumerate(self.timelines) for s in self._starts(timeline)]

    def _starts(self, timeline: VideoTimeline) -> list[int]:
        w = self.window
        stride = w.train_stride if self.train else w.test_stride
        starts = windows.window_starts(timeline.num_frames, w.length, stride, w.frame_interval)
        if not self.train or w.train_empty:
            return starts
        return [s for s in starts if len(self._targets(timeline, s).labels)]

    def _targets(self, timeline: VideoTimeline, start: int) -> windows.WindowTargets:
        w = self.window
        return windows.window_targets(timeline.segments, timeline.labels, timeline.ambiguous, start, w.length,
                                      w.frame_interval, timeline.num_frames, w.min_inside if self.train else 0.0)

    def set_epoch(self, epoch: int) -> None:
        """Selects the view of every following training item."""
        self.view = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        item, view = key if isinstance(key, tuple) else (key, self.view)
        video, start = self.items[int(item)]
        timeline, w, clip = self.timelines[video], self.window, self.clip
        rng = np.random.default_rng([self.seed, int(view), int(item)]) if self.train else None
        size = tuple(clip.resize) if clip.resize is not None else None
        with VideoFile(self.videos[video].path, size) as reader:
            # The decoder may count fewer frames than the probe did (a truncated file): clamp to it.
            frames = reader.read(windows.window_indices(start, w.length, w.frame_interval, reader.num_frames))
        params = draw_params(rng, frames.shape[1:3], clip.resize, clip.crop,
                             augment=self.train and clip.augment, hflip=clip.hflip)
        targets = self._targets(timeline, start)
        return {
            "clip": apply_params(frames, params),
            "segments": torch.from_numpy(targets.segments).float(),
            "labels": torch.from_numpy(targets.labels),
            "ambiguous": torch.from_numpy(targets.ambiguous).float(),
            "valid_steps": targets.valid_steps,
            "video": video,
            "start": start,
            "index": int(item),
        }


def collate_windows(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the clips and numbers; segments, labels and Ambiguous spans stay per-window lists."""
    ragged = ("segments", "labels", "ambiguous")
    batch: dict[str, Any] = {"clip": torch.stack([it["clip"] for it in items])}
    for key in ("valid_steps", "video", "start", "index"):
        batch[key] = torch.tensor([it[key] for it in items], dtype=torch.long)
    for key in ragged:
        batch[key] = [it[key] for it in items]
    batch["skipped"] = 0
    return batch
