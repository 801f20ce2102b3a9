"""Synthetic untrimmed videos for temporal action detection, laid out like THUMOS14.

Each video is a few hundred frames of one group's look (background texture, camera shake, flicker,
noise and distractors drifting to and fro) with the figure idling (a slight sway) and, in 1-3
segments, doing one of the synthetic action classes of `kdhar.data.synthetic`. The figure blends
into and out of each motion over `BLEND` frames outside the segment, so a boundary is a change of
motion, not a cut. A share of the videos also holds one half-hearted motion (a third of the usual
amplitude) annotated as Ambiguous, as THUMOS14 marks unclear instances.

Motions keep the pace of the recognition clips: `REFERENCE_FRAMES` frames are one unit of the
catalogue's time, so a one-off motion (sit down, slide, spin then jump) fills its segment from first
to last frame, while the speed classes oscillate at their own rates whatever the segment's length
(a long WaveSlow is more slow waves, not slower ones).

Validation videos (the training subset, as in THUMOS14) and test videos come from disjoint groups,
so the test set has a group shift. Everything is drawn from `numpy.random.default_rng` seeded by
(seed, 14, group, video[, chunk]), so one spec always renders the same frames.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdhar.data import thumos14
from kdhar.data.synthetic import (
    CATALOGUE,
    MARKER,
    GroupStyle,
    Pose,
    SynthError,
    SynthSpec,
    group_style,
    marker_record,
    motion,
    motion_amplitude,
    motion_pose,
    prepare_root,
    render_pose,
    rest_pose,
)
from kdhar.data.video import write_video

LAYOUT = "thumos14"
_CODE = 14  # seeds this layout's videos apart from the recognition layouts'
REFERENCE_FRAMES = 32  # a recognition clip (SynthSpec.frames): one unit of the catalogue's time
BLEND = 6  # frames on each side of a segment over which the figure eases into and out of it
MIN_GAP = 2 * BLEND + 4  # idle frames between segments and at the ends of a video
AMBIGUOUS_AMPLITUDE = 0.35  # a half-hearted motion, relative to the class's usual amplitude
DRIFT_PERIOD = 2.0  # clip units a distractor takes to drift one way before it turns back
CHUNK = 128  # frames rendered at once; bounds memory to that of a 128-frame clip

# One pair of each kind first (reversal, direction, speed, order), then the rest of the catalogue.
_ORDER = ["SitDown", "StandUp", "SlideLeft", "SlideRight", "WaveSlow", "WaveFast", "RightThenUp", "UpThenRight",
          "Approach", "Recede", "SpinClockwise", "SpinCounterclockwise", "BounceSlow", "BounceFast",
          "OpenHand", "CloseHand", "SpinThenJump", "JumpThenSpin", "RaiseArm", "LowerArm", "TiltLeft",
          "TiltRight", "PulseSlow", "PulseFast"]


@dataclass(frozen=True)
class UntrimmedSpec:
    """What to generate; the defaults make 20 validation and 20 test videos of 256-512 frames."""

    num_classes: int = 8  # taken in `_ORDER`, so the default holds one pair of every kind
    groups: int = 10  # looks; the first half are validation (training) videos, the rest test videos
    videos_per_group: int = 4
    frames: tuple[int, int] = (256, 512)  # video length range; a video grows when its segments need room
    segments: tuple[int, int] = (1, 3)  # action segments per video
    segment_frames: tuple[int, int] = (32, 64)  # segment length range
    ambiguous: float = 0.2  # share of videos that also hold one Ambiguous segment
    size: tuple[int, int] = (96, 128)  # (H, W), as the recognition sets
    fps: int = 25
    difficulty: float = 0.5  # 0 easy .. 1 hard, as SynthSpec; 0 has no distractors, so no moving clutter
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("frames", "segments", "segment_frames", "size"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        _check_range("frames", self.frames, 2 * MIN_GAP + 2)
        _check_range("segments", self.segments, 1)
        _check_range("segment_frames", self.segment_frames, 2)
        if not 2 <= self.num_classes <= len(CATALOGUE):
            raise SynthError(f"UntrimmedSpec.num_classes={self.num_classes}: choose 2-{len(CATALOGUE)}")
        if self.groups < 2 or self.videos_per_group < 1:
            raise SynthError(
                f"UntrimmedSpec.groups={self.groups}, videos_per_group={self.videos_per_group}: need at least "
                "2 groups (validation and test looks) and 1 video per group"
            )
        if not 0.0 <= self.ambiguous <= 1.0:
            raise SynthError(f"UntrimmedSpec.ambiguous={self.ambiguous}: a share, in [0, 1]")
        # SynthSpec checks size, fps and difficulty with the recognition sets' messages.
        self.look()

    def look(self) -> SynthSpec:
        """The recognition spec whose size, fps, difficulty and seed this set shares (group looks)."""
        return SynthSpec(size=self.size, fps=self.fps, difficulty=self.difficulty, seed=self.seed)


def _check_range(name: str, pair: tuple[int, ...], least: int) -> None:
    if len(pair) != 2 or pair[0] < least or pair[1] < pair[0]:
        raise SynthError(f"UntrimmedSpec.{name}={pair}: give (low, high) with {least} <= low <= high")


@dataclass(frozen=True)
class PlannedSegment:
    """One motion in a video: its class, first frame and length; `ambiguous` ones are half-hearted."""

    class_name: str
    start: int
    length: int
    ambiguous: bool = False


@dataclass(frozen=True)
class VideoPlan:
    """One video to render: its name, subset, group, length and motions, and the seed of its draws."""

    name: str
    subset: str  # "train" (THUMOS14's validation videos) or "test"
    group: int
    frames: int
    segments: tuple[PlannedSegment, ...]
    seed: tuple[int, ...]


def class_names(num_classes: int) -> list[str]:
    """The detection classes for `num_classes`, sorted (label order, as THUMOS14's list)."""
    return sorted(_ORDER[:num_classes])


def held_out_groups(groups: int) -> range:
    """The groups (1-based) whose videos are test videos: the later half."""
    return range(groups - groups // 2 + 1, groups + 1)


def plan_videos(spec: UntrimmedSpec) -> list[VideoPlan]:
    """Every video of the set, validation videos first, numbered from 1 within their subset."""
    classes = class_names(spec.num_classes)
    tests = set(held_out_groups(spec.groups))
    plans, counts = [], {"train": 0, "test": 0}
    for group in range(1, spec.groups + 1):
        subset = "test" if group in tests else "train"
        for clip in range(1, spec.videos_per_group + 1):
            counts[subset] += 1
            name = f"video_{'test' if subset == 'test' else 'validation'}_{counts[subset]:07d}"
            seed = (spec.seed, _CODE, group, clip)
            frames, segments = _place_segments(np.random.default_rng([*seed, 0]), spec, classes)
            plans.append(VideoPlan(name, subset, group, frames, segments, seed))
    return plans


def _place_segments(rng: np.random.Generator, spec: UntrimmedSpec, classes: list[str]
                    ) -> tuple[int, tuple[PlannedSegment, ...]]:
    """Draws the video's length and its non-overlapping segments, at least MIN_GAP frames apart."""
    count = int(rng.integers(spec.segments[0], spec.segments[1] + 1))
    ambiguous = [False] * count + ([True] if rng.random() < spec.ambiguous else [])
    rng.shuffle(ambiguous)
    lengths = rng.integers(spec.segment_frames[0], spec.segment_frames[1] + 1, size=len(ambiguous))
    names = rng.choice(classes, size=len(ambiguous))
    frames = int(rng.integers(spec.frames[0], spec.frames[1] + 1))
    frames = max(frames, int(lengths.sum()) + (len(lengths) + 1) * MIN_GAP)
    spare = frames - int(lengths.sum()) - (len(lengths) + 1) * MIN_GAP
    cuts = np.sort(rng.integers(0, spare + 1, size=len(lengths)))
    extra = np.diff(np.concatenate([[0], cuts]))  # the spare frames before each segment
    segments, start = [], 0
    for name, length, gap, amb in zip(names, lengths, extra, ambiguous):
        start += MIN_GAP + int(gap)
        segments.append(PlannedSegment(str(name), start, int(length), amb))
        start += int(length)
    return frames, tuple(segments)


def annotations(plan: VideoPlan, classes: list[str], fps: int
                ) -> tuple[list[thumos14.Segment], list[tuple[float, float]]]:
    """The video's segments and Ambiguous spans in seconds: frames [start, start + length)."""
    label = {name: i for i, name in enumerate(classes)}
    segments, ambiguous = [], []
    for seg in plan.segments:
        start, end = seg.start / fps, (seg.start + seg.length) / fps
        if seg.ambiguous:
            ambiguous.append((start, end))
        else:
            segments.append(thumos14.Segment(label[seg.class_name], start, end))
    return segments, ambiguous


def timeline(plan: VideoPlan, difficulty: float) -> tuple[Pose, np.ndarray]:
    """The figure's pose over the whole video and the time of every frame in clip units."""
    rng = np.random.default_rng([*plan.seed, 1])
    tau = np.arange(plan.frames, dtype=np.float32) / (REFERENCE_FRAMES - 1)
    phases = rng.uniform(0.0, 1.0, size=3)
    rest = rest_pose(tau)
    idle = rest_pose(
        tau,
        dx=0.012 * np.sin(2.0 * math.pi * (0.25 * tau + phases[0])),
        arm_r=rest.arm_r + 0.1 * np.sin(2.0 * math.pi * (0.4 * tau + phases[1])),
        arm_l=rest.arm_l - 0.1 * np.sin(2.0 * math.pi * (0.33 * tau + phases[2])),
    )
    fields = {f.name: getattr(idle, f.name).copy() for f in dataclasses.fields(Pose)}
    amp = motion_amplitude(difficulty)
    for seg in plan.segments:
        _paste(fields, _segment_pose(seg, rng, amp), seg.start, seg.length)
    return Pose(**fields), tau


def _segment_pose(seg: PlannedSegment, rng: np.random.Generator, amp: float) -> Pose:
    entry = motion(seg.class_name)
    local = np.arange(seg.length, dtype=np.float32) / (REFERENCE_FRAMES - 1)
    if entry.kind == "speed":  # oscillations keep the recognition clips' rates
        speed, centre = rng.uniform(0.9, 1.25), 0.5
    else:  # a one-off motion runs from the segment's first frame to its last
        speed, centre = (REFERENCE_FRAMES - 1) / (seg.length - 1), 0.5 * (seg.length - 1) / (REFERENCE_FRAMES - 1)
    scale = AMBIGUOUS_AMPLITUDE if seg.ambiguous else 1.0
    return motion_pose(entry, local, speed, centre, rng.uniform(0.0, 1.0), amp * scale)


def _paste(fields: dict[str, np.ndarray], pose: Pose, start: int, length: int) -> None:
    """Writes a segment's pose into the timeline and eases the idle pose into and out of it."""
    end = start + length
    weights = np.arange(1, BLEND + 1, dtype=np.float32) / (BLEND + 1)  # idle's share, nearest frame first
    for name, values in fields.items():
        motion_values = getattr(pose, name)
        first, last = motion_values[0], motion_values[-1]
        before, after = values[start - BLEND:start][::-1], values[end:end + BLEND]
        if name in ("rot", "arm_r", "arm_l"):  # ease to the nearest equal angle, not back through full turns
            first, last = _nearest_angle(first, before[0]), _nearest_angle(last, after[0])
        values[start - BLEND:start] = ((1 - weights) * first + weights * before)[::-1]
        values[end:end + BLEND] = (1 - weights) * last + weights * after
        values[start:end] = motion_values


def _nearest_angle(angle: float, reference: float) -> float:
    return reference + (angle - reference + math.pi) % (2 * math.pi) - math.pi


def render_video(plan: VideoPlan, style: GroupStyle, spec: UntrimmedSpec) -> np.ndarray:
    """The video's uint8 RGB frames (T, H, W, 3), rendered CHUNK frames at a time."""
    pose, tau = timeline(plan, spec.difficulty)
    drift = (0.5 - 0.5 * np.cos(math.pi * tau / DRIFT_PERIOD)).astype(np.float32)
    chunks = []
    for k, first in enumerate(range(0, plan.frames, CHUNK)):
        # The same state for every chunk: the figure's place, shake and distractors carry on.
        rng = np.random.default_rng([*plan.seed, 2])
        chunks.append(render_pose(pose, style, rng, spec.size, spec.difficulty, tau, drift,
                                  frames=slice(first, first + CHUNK),
                                  noise_rng=np.random.default_rng([*plan.seed, 3, k])))
    return np.concatenate(chunks)


@dataclass(frozen=True)
class _Job:
    plan: VideoPlan
    style: GroupStyle
    spec: UntrimmedSpec
    path: Path


def _run_job(job: _Job) -> None:
    # Videos are written atomically, so an existing file is complete and can be kept on resume.
    if not job.path.exists():
        write_video(job.path, render_video(job.plan, job.style, job.spec), fps=job.spec.fps)


@dataclass(frozen=True)
class GeneratedUntrimmed:
    """Where a generated set lives, its class names (label order) and its video counts per subset."""

    root: Path
    classes: list[str]
    num_videos: dict[str, int]


def generate(
    out_root: str | Path,
    spec: UntrimmedSpec | None = None,
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> GeneratedUntrimmed:
    """Writes a THUMOS14-style set: .mp4 videos under validation/ and test/, the annotations and
    the class list under annotations/ (see `kdhar.data.thumos14`).

    Re-running with the same settings returns at once when the set is finished and resumes it when
    it was interrupted; other settings need `overwrite` (which deletes the old set).

    Args:
        out_root: folder to fill; must be empty, absent, or a set written by this function.
        spec: what to generate; `UntrimmedSpec()` when None.
        workers: processes rendering and encoding in parallel (1 renders in this process).
        on_progress: called as `on_progress(done, total)` after each video.
        overwrite: replace a set made with other settings.
    """
    spec = spec or UntrimmedSpec()
    if workers < 1:
        raise SynthError(f"workers={workers}: must be at least 1")
    root = Path(out_root)
    classes = class_names(spec.num_classes)
    plans = plan_videos(spec)
    counts = {s: sum(p.subset == s for p in plans) for s in thumos14.ANNOTATION_SUFFIX}
    if not prepare_root(root, LAYOUT, spec, overwrite):
        _write_annotations(root / "annotations", plans, classes, spec.fps)
        styles = {g: group_style(g, spec.look(), LAYOUT) for g in range(1, spec.groups + 1)}
        jobs = [_Job(p, styles[p.group], spec, root / thumos14.VIDEO_FOLDERS[p.subset][0] / f"{p.name}.mp4")
                for p in plans]
        _run_jobs(jobs, workers, on_progress)
        (root / MARKER).write_text(json.dumps(marker_record(LAYOUT, spec, True), indent=2))
    elif on_progress:
        on_progress(len(plans), len(plans))
    return GeneratedUntrimmed(root, classes, counts)


def _write_annotations(folder: Path, plans: list[VideoPlan], classes: list[str], fps: int) -> None:
    for subset in thumos14.ANNOTATION_SUFFIX:
        videos = [(p.name, *annotations(p, classes, fps)) for p in plans if p.subset == subset]
        thumos14.write_annotations(folder, classes, subset, videos)
    thumos14.write_class_list(folder, classes)


def _run_jobs(jobs: list[_Job], workers: int, on_progress: Callable[[int, int], None] | None) -> None:
    done = 0
    if workers == 1:
        for job in jobs:
            _run_job(job)
            done += 1
            if on_progress:
                on_progress(done, len(jobs))
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(_run_job, job) for job in jobs]):
            future.result()  # re-raises a worker's error here
            done += 1
            if on_progress:
                on_progress(done, len(jobs))
