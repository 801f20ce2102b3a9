"""`kdhar data check`: decode every video a split (or, for THUMOS14, an annotation file) lists and report
what is missing or broken; and the check of a crop against the videos' own frames, which reads one of them."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdhar.data.index import SUBSETS, read_split
from kdhar.data.video import VideoError, VideoFile, frame_size

# Frames decoded per video: first, middle and last. Truncated and corrupt files fail on one of
# them, at a fraction of the cost of decoding everything.
_PROBE_POINTS = 3


@dataclass
class CheckReport:
    """Result of `check_dataset`. `counts[subset][class]` counts the readable videos."""

    root: Path
    dataset: str
    split: int
    classes: list[str]
    counts: dict[str, dict[str, int]]
    missing: list[Path] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)
    frame_counts: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.bad


def check_dataset(
    root: str | Path,
    dataset: str = "ucf101",
    split: int = 1,
    workers: int = 2,
    split_dir: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Opens every video of the split's train and test lists in parallel and records the bad ones.

    Args:
        root: dataset folder.
        dataset: "ucf101", "hmdb51" or "folder".
        split: official split number, 1-3.
        workers: processes decoding in parallel.
        split_dir: where the split files are, if not under `root`.
        on_progress: called as (videos decoded, videos to decode) while the check runs.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    listed = {}
    classes: list[str] = []
    for subset in SUBSETS:
        listed[subset], classes = read_split(dataset, root, split, subset, split_dir)
    report = CheckReport(
        root=Path(root), dataset=dataset, split=split, classes=classes, counts={s: {} for s in SUBSETS}
    )
    present = []
    for subset in SUBSETS:
        for sample in listed[subset]:
            if sample.path.is_file():
                present.append((subset, sample))
            else:
                report.missing.append(sample.path)
    paths = [sample.path for _, sample in present]
    good: dict[str, Counter] = {s: Counter() for s in SUBSETS}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_probe, paths, chunksize=max(1, len(paths) // (workers * 8)))
        for done, ((subset, sample), (frames, reason)) in enumerate(zip(present, results), 1):
            if on_progress is not None:
                on_progress(done, len(present))
            if reason is None:
                good[subset][classes[sample.label]] += 1
                report.frame_counts.append(frames)
            else:
                report.bad.append((sample.path, reason))
    report.counts = {s: {name: good[s][name] for name in classes} for s in SUBSETS}
    return report


def check_crop_in_frames(crop: int, dataset: str, root: str | Path, split: int = 1,
                         split_dir: str | Path | None = None) -> None:
    """Refuses a crop larger than the frames of the dataset's videos (the first listed training video's).

    At the CPU size the resize follows the crop, so no check of the crop against the resize can fail:
    a 1000-pixel crop would scale 96x128 videos up twelvefold, every clip of every epoch. Only the
    first video's header is read here.

    Raises:
        ValueError: the crop does not fit, naming the crop, the frame size and the file.
    """
    listed, _ = read_split(dataset, root, split, "train", split_dir)
    first = next((sample.path for sample in listed if sample.path.is_file()), None)
    if first is None:
        return  # the run's own index names the missing videos
    height, width = frame_size(first)
    if crop > min(height, width):
        raise ValueError(
            f"crop={crop}: larger than the {height}x{width} frames of the videos ({first}), which the CPU "
            f"size would scale up to fit it; use a crop of {min(height, width)} or less"
        )


# What `data check` shows when it finds no split files where it looked.
LAYOUTS = {
    "ucf101": "UCF101: <root>/<Class>/v_<Class>_gNN_cNN.avi, with classInd.txt, trainlist0N.txt and testlist0N.txt "
              "in <root>, <root>/ucfTrainTestlist, or a ucfTrainTestlist folder beside <root> (or --split-dir)",
    "hmdb51": "HMDB51: <root>/<class>/<video>.avi, with <root>/testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt "
              "(or --split-dir)",
    "folder": "folder: <root>/<class>/*.mp4|avi|..., optionally with <root>/manifest.csv (path,label[,split][,group]); "
              "--dataset folder",
    "thumos14": "THUMOS14: <root>/validation/*.mp4 and <root>/test/*.mp4, with <Class>_val.txt, <Class>_test.txt, "
                "Ambiguous_*.txt and detclasslist.txt in <root>/annotations (or --split-dir); --dataset thumos14 "
                "(temporal detection)",
}


def format_report(report: CheckReport) -> str:
    """Renders a report as text: totals, per-class counts, then every missing or bad file."""
    total_ok = sum(sum(c.values()) for c in report.counts.values())
    lines = [
        f"{report.dataset} split {report.split} at {report.root}: {total_ok} readable, "
        f"{len(report.missing)} missing, {len(report.bad)} unreadable",
    ]
    if report.frame_counts:
        lines.append(
            f"frames per video: min {min(report.frame_counts)}, "
            f"median {statistics.median(report.frame_counts):g}, max {max(report.frame_counts)}"
        )
    width = max((len(name) for name in report.classes), default=5)
    lines.append(f"{'class':<{width}}  {'train':>6}  {'test':>6}")
    for name in report.classes:
        lines.append(f"{name:<{width}}  {report.counts['train'][name]:>6}  {report.counts['test'][name]:>6}")
    lines.extend(f"missing: {path}" for path in report.missing)
    lines.extend(f"unreadable: {path}: {reason}" for path, reason in report.bad)
    if not report.ok:
        lines.append("Re-download or re-encode these files, or train with on_missing/on_bad = 'skip'.")
    return "\n".join(lines)


def _probe(path: Path) -> tuple[int, str | None]:
    # Runs in a pool process: returns plain values, which pickle back reliably.
    try:
        with VideoFile(path) as video:
            n = video.num_frames
            video.read(np.linspace(0, n - 1, _PROBE_POINTS).round().astype(np.int64))
    except VideoError as exc:
        return 0, exc.reason
    return n, None


@dataclass
class DetectionCheckReport:
    """Result of `check_detection`: per subset, the videos read, segments per class, Ambiguous spans,
    the missing and unreadable videos, and segments that end after their video does."""

    root: Path
    classes: list[str]
    videos: dict[str, int]
    segments: dict[str, dict[str, int]]
    ambiguous: dict[str, int]
    missing: list[tuple[Path, str]] = field(default_factory=list)  # (path, annotation file:line naming it)
    bad: list[tuple[Path, str]] = field(default_factory=list)
    late: list[tuple[str, float, float]] = field(default_factory=list)  # (video, segment end s, video length s)
    frame_counts: list[int] = field(default_factory=list)
    fps: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.bad


def check_detection(
    root: str | Path,
    workers: int = 2,
    annotation_dir: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DetectionCheckReport:
    """Parses a THUMOS14-style copy's annotations (train: validation videos, test: test videos) and
    decodes the start, middle and end of every video they name.

    Raises:
        AnnotationError: an annotation or class file is absent or malformed (one line naming it).
    """
    from kdhar.data.thumos14 import read_annotations

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    listed = {subset: read_annotations(root, subset, annotation_dir) for subset in SUBSETS}
    classes = listed["train"][1]
    report = DetectionCheckReport(Path(root), classes, {}, {}, {})
    present = []
    for subset, (videos, _) in listed.items():
        report.segments[subset] = dict(Counter(classes[s.label] for v in videos for s in v.segments))
        report.ambiguous[subset] = sum(len(v.ambiguous) for v in videos)
        report.videos[subset] = sum(v.path.is_file() for v in videos)
        report.missing.extend((v.path, v.source) for v in videos if not v.path.is_file())
        present.extend(v for v in videos if v.path.is_file())
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_probe_info, [v.path for v in present], chunksize=max(1, len(present) // (workers * 8)))
        for done, (video, (frames, fps, reason)) in enumerate(zip(present, results), 1):
            if on_progress is not None:
                on_progress(done, len(present))
            if reason is not None:
                report.bad.append((video.path, reason))
                continue
            report.frame_counts.append(frames)
            report.fps.append(fps)
            report.late.extend(_late_segments(video, frames, fps))
    return report


def _late_segments(video, frames: int, fps: float) -> list[tuple[str, float, float]]:
    # Half a frame of slack: annotations are rounded to a tenth of a second or a millisecond.
    length = frames / fps if fps > 0 else float("inf")
    ends = [s.end for s in video.segments] + [end for _, end in video.ambiguous]
    return [(video.name, end, length) for end in ends if end > length + 0.5 / max(fps, 1e-9)]


def format_detection_report(report: DetectionCheckReport) -> str:
    """Renders a detection report: totals, segments per class and subset, then every problem."""
    lines = [
        f"thumos14 at {report.root}: {report.videos['train']} train (validation) and {report.videos['test']} test "
        f"videos readable, {len(report.missing)} missing, {len(report.bad)} unreadable",
    ]
    if report.frame_counts:
        lines.append(
            f"frames per video: min {min(report.frame_counts)}, median {statistics.median(report.frame_counts):g}, "
            f"max {max(report.frame_counts)}; fps {min(report.fps):g}-{max(report.fps):g}"
        )
    width = max([len(name) for name in report.classes] + [len("Ambiguous")])
    lines.append(f"{'segments':<{width}}  {'train':>6}  {'test':>6}")
    for name in report.classes:
        lines.append(f"{name:<{width}}  {report.segments['train'].get(name, 0):>6}  {report.segments['test'].get(name, 0):>6}")
    lines.append(f"{'Ambiguous':<{width}}  {report.ambiguous['train']:>6}  {report.ambiguous['test']:>6}")
    lines.extend(f"missing: {path} (named at {source})" for path, source in report.missing)
    lines.extend(f"unreadable: {path}: {reason}" for path, reason in report.bad)
    lines.extend(f"segment past the end: {name} ends at {end:g} s, the video at {length:.2f} s"
                 for name, end, length in report.late)
    if not report.ok:
        lines.append("Re-download or re-encode these files, or train with on_missing = 'skip'.")
    return "\n".join(lines)


def _probe_info(path: Path) -> tuple[int, float, str | None]:
    try:
        with VideoFile(path) as video:
            n = video.num_frames
            video.read(np.linspace(0, n - 1, _PROBE_POINTS).round().astype(np.int64))
    except VideoError as exc:
        return 0, 0.0, exc.reason
    return n, video.fps, None
