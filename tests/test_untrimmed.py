"""The synthetic untrimmed set: THUMOS14's layout and annotations, real videos that decord reads,
segments where the figure moves, and `kdhar data synth --layout thumos14`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from kdhar.cli import main
from kdhar.data import untrimmed
from kdhar.data.synthetic import MARKER, SynthError, group_style
from kdhar.data.thumos14 import load_detection_index
from kdhar.data.video import read_frames, video_info

TINY = untrimmed.UntrimmedSpec(
    num_classes=4, groups=2, videos_per_group=2, frames=(60, 80), segments=(1, 2), segment_frames=(10, 14),
    ambiguous=0.5, size=(32, 64), difficulty=0.5, seed=3,  # decord cannot read 48-wide videos
)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("thumos14")
    untrimmed.generate(root, TINY)
    return root


def test_the_set_reads_back_as_thumos14_with_every_planned_segment(tiny_set: Path) -> None:
    plans = untrimmed.plan_videos(TINY)
    classes = untrimmed.class_names(TINY.num_classes)
    for subset in ("train", "test"):
        index = load_detection_index(tiny_set, subset)
        assert index.classes == classes == sorted(classes)
        planned = {p.name: p for p in plans if p.subset == subset}
        assert sorted(v.name for v in index.videos) == sorted(planned)
        for video in index.videos:
            plan = planned[video.name]
            frames, fps = video_info(video.path)
            assert (frames, fps) == (plan.frames, TINY.fps)
            expected = sorted((classes.index(s.class_name), s.start / fps, (s.start + s.length) / fps)
                              for s in plan.segments if not s.ambiguous)
            assert sorted((s.label, s.start, s.end) for s in video.segments) == expected
            assert len(video.ambiguous) == sum(s.ambiguous for s in plan.segments)
    assert any(s.ambiguous for p in plans for s in p.segments)  # the fixture exercises Ambiguous
    groups = {subset: {p.group for p in plans if p.subset == subset} for subset in ("train", "test")}
    assert groups == {"train": {1}, "test": {2}}  # test looks never appear in training


def test_segments_fit_apart_and_default_videos_are_256_to_512_frames_long() -> None:
    for spec in (TINY, untrimmed.UntrimmedSpec()):
        for plan in untrimmed.plan_videos(spec):
            starts = [s.start for s in plan.segments]
            ends = [s.start + s.length for s in plan.segments]
            assert starts[0] >= untrimmed.MIN_GAP and plan.frames - ends[-1] >= untrimmed.MIN_GAP
            assert all(b - a >= untrimmed.MIN_GAP for a, b in zip(ends, starts[1:]))
            assert spec.segments[0] <= sum(not s.ambiguous for s in plan.segments) <= spec.segments[1]
    default = untrimmed.plan_videos(untrimmed.UntrimmedSpec())
    assert len(default) == 40 and min(p.frames for p in default) >= 256
    assert max(p.frames for p in default) <= 512


def test_the_figure_moves_in_its_segments_and_idles_between_them() -> None:
    plan = untrimmed.plan_videos(untrimmed.UntrimmedSpec(ambiguous=0.0))[0]
    pose, _ = untrimmed.timeline(plan, difficulty=0.5)
    change = sum(np.abs(np.diff(getattr(pose, f.name))) for f in dataclasses.fields(pose))
    inside = np.zeros(plan.frames - 1, bool)
    for seg in plan.segments:
        inside[seg.start: seg.start + seg.length - 1] = True
    near = inside.copy()
    for seg in plan.segments:  # the eases in and out belong to neither side
        near[seg.start - untrimmed.BLEND - 1: seg.start + seg.length + untrimmed.BLEND] = True
    assert change[inside].mean() > 5 * change[~near].mean() > 0  # idling is a sway, not a still frame


def test_chunks_continue_one_video(tiny_set: Path, monkeypatch) -> None:
    plan = untrimmed.plan_videos(TINY)[0]
    quiet = dataclasses.replace(group_style(plan.group, TINY.look(), "thumos14"), noise=0.0)  # noise is per chunk
    whole = untrimmed.render_video(plan, quiet, TINY)
    monkeypatch.setattr(untrimmed, "CHUNK", 16)
    assert np.array_equal(untrimmed.render_video(plan, quiet, TINY), whole)
    decoded = read_frames(tiny_set / "validation" / f"{plan.name}.mp4", range(plan.frames))
    assert decoded.shape == (plan.frames, *TINY.size, 3)


def test_a_finished_set_is_kept_and_other_settings_are_refused(tiny_set: Path) -> None:
    marker = (tiny_set / MARKER).stat().st_mtime_ns
    untrimmed.generate(tiny_set, TINY)
    assert (tiny_set / MARKER).stat().st_mtime_ns == marker
    with pytest.raises(SynthError, match="other settings"):
        untrimmed.generate(tiny_set, dataclasses.replace(TINY, seed=4))


@pytest.mark.parametrize("kwargs, message", [
    ({"frames": (20, 30)}, r"frames=\(20, 30\).*34 <= low"),
    ({"segment_frames": (20, 10)}, r"segment_frames=\(20, 10\)"),
    ({"groups": 1}, "need at least 2 groups"),
    ({"ambiguous": 1.5}, "ambiguous=1.5"),
    ({"difficulty": 2.0}, "difficulty=2.0"),
])
def test_a_bad_spec_is_refused_in_one_line(kwargs, message) -> None:
    with pytest.raises(SynthError, match=message):
        untrimmed.UntrimmedSpec(**kwargs)


def test_data_synth_thumos14_writes_a_set_data_check_reads(tmp_path: Path, monkeypatch, capsys) -> None:
    argv = ["kdhar", "data", "synth", "--layout", "thumos14", "--out", str(tmp_path), "--classes", "2",
            "--groups", "2", "--clips-per-group", "1", "--frames", "40", "--workers", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    assert f"wrote 1 train, 1 test untrimmed videos, 2 classes -> {tmp_path / 'thumos14'}" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["kdhar", "data", "check", str(tmp_path / "thumos14"), "--dataset", "thumos14",
                                      "--workers", "1"])
    main()
    text = capsys.readouterr().out
    assert "1 train (validation) and 1 test videos readable, 0 missing, 0 unreadable" in text
    assert "segment past the end" not in text
