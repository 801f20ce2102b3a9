"""THUMOS14's annotation format: reading a copy laid out like the official archives, one-line errors
for malformed lines and missing videos, and `kdhar data check --dataset thumos14`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kdhar.cli import main
from kdhar.data.check import check_detection, format_detection_report
from kdhar.data.index import MissingVideosError
from kdhar.data.thumos14 import (
    AnnotationError,
    Segment,
    load_detection_index,
    read_annotations,
    write_annotations,
    write_class_list,
)
from kdhar.data.video import write_video

# Shaped like the official files: two spaces in some lines, one decimal, CRLF in one file.
VAL = {
    "BaseballPitch": "video_validation_0000051  67.5 75.9\nvideo_validation_0000051  85.9 90.6\n",
    "HighJump": "video_validation_0000052 2.0 6.4\r\nvideo_validation_0000051 10.0 12.5\r\n",
}
TEST = {"BaseballPitch": "video_test_0000004 0.2 1.1\n", "HighJump": ""}


def tiny_video(path: Path, frames: int = 6, fps: int = 10) -> None:
    # 32 pixels: decord cannot copy out frames of 16x16 videos.
    write_video(path, np.full((frames, 32, 32, 3), 90, np.uint8), fps=fps)


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    """A real-format copy: class list with UCF101 ids, val annotations in annotations/, test videos
    in TH14_test_set_mp4/ as the test archive unpacks."""
    notes = tmp_path / "annotations"
    notes.mkdir()
    (notes / "detclasslist.txt").write_text("7 BaseballPitch\n40 HighJump\n")
    for name, text in VAL.items():
        (notes / f"{name}_val.txt").write_bytes(text.encode())
    for name, text in TEST.items():
        (notes / f"{name}_test.txt").write_text(text)
    (notes / "Ambiguous_val.txt").write_text("video_validation_0000052 7.0 8.0\nvideo_validation_0000053 1.0 2.0\n")
    for name in ("video_validation_0000051", "video_validation_0000052", "video_validation_0000053"):
        tiny_video(tmp_path / "validation" / f"{name}.mp4")
    tiny_video(tmp_path / "TH14_test_set_mp4" / "video_test_0000004.mp4")
    return tmp_path


def test_train_reads_the_validation_files_and_test_the_test_files(copy: Path) -> None:
    train = load_detection_index(copy, "train")
    assert train.classes == ["BaseballPitch", "HighJump"] and train.background == 2
    by_name = {v.name: v for v in train.videos}
    assert [v.name for v in train.videos] == ["video_validation_0000051", "video_validation_0000052",
                                               "video_validation_0000053"]
    assert by_name["video_validation_0000051"].segments == (
        Segment(0, 67.5, 75.9), Segment(0, 85.9, 90.6), Segment(1, 10.0, 12.5))
    assert by_name["video_validation_0000052"].ambiguous == ((7.0, 8.0),)
    # A video only the Ambiguous file names is still scored: detections there can be false positives.
    assert by_name["video_validation_0000053"].segments == () and by_name["video_validation_0000053"].ambiguous
    assert by_name["video_validation_0000051"].source.endswith("BaseballPitch_val.txt:1")

    test = load_detection_index(copy, "test")
    assert [(v.name, v.path.parent.name, v.segments) for v in test.videos] == [
        ("video_test_0000004", "TH14_test_set_mp4", (Segment(0, 0.2, 1.1),))]


def test_without_a_class_list_the_class_files_name_the_classes(copy: Path) -> None:
    (copy / "annotations" / "detclasslist.txt").unlink()
    _, classes = read_annotations(copy, "train")
    assert classes == ["BaseballPitch", "HighJump"]  # sorted, Ambiguous left out


@pytest.mark.parametrize("line", [
    "video_validation_0000051 67.5",  # a field short
    "video_validation_0000051 67.5 75.9 3",  # a field too many
    "video_validation_0000051 start 75.9",  # not a number
    "video_validation_0000051 75.9 67.5",  # ends before it starts
    "video_validation_0000051 -1.0 2.0",  # negative time
])
def test_a_malformed_annotation_line_names_its_file_and_line(copy: Path, line: str) -> None:
    path = copy / "annotations" / "HighJump_val.txt"
    path.write_text(f"video_validation_0000052 2.0 6.4\n\n{line}\n")
    with pytest.raises(AnnotationError) as err:
        load_detection_index(copy, "train")
    message = str(err.value)
    assert message.startswith(f"{path}:3: expected '<video> <start> <end>'") and repr(line) in message
    assert "\n" not in message


def test_a_malformed_class_list_line_and_an_absent_class_file_are_named(copy: Path) -> None:
    class_list = copy / "annotations" / "detclasslist.txt"
    class_list.write_text("7 BaseballPitch\n40 High Jump\n")
    with pytest.raises(AnnotationError, match=rf"^{class_list}:2: expected '<id> <ClassName>'"):
        read_annotations(copy, "train")
    class_list.write_text("7 BaseballPitch\n40 HighJump\n9 Billiards\n")
    with pytest.raises(AnnotationError, match=r"^annotation file Billiards_val.txt not found in .*--split-dir"):
        read_annotations(copy, "train")


def test_a_missing_video_names_the_annotation_line_that_lists_it(copy: Path) -> None:
    (copy / "validation" / "video_validation_0000052.mp4").unlink()
    with pytest.raises(MissingVideosError) as err:
        load_detection_index(copy, "train")
    message = str(err.value)
    assert message.startswith(f"{copy / 'annotations' / 'HighJump_val.txt'}:1: video video_validation_0000052 is not in")
    assert "1 of 3 train videos are missing" in message and "\n" not in message
    index = load_detection_index(copy, "train", on_missing="skip")
    assert index.missing == 1 and len(index.videos) == 2


def test_written_annotations_read_back_exactly(tmp_path: Path) -> None:
    classes = ["SitDown", "WaveFast", "WaveSlow"]
    videos = [("video_test_0000001", [Segment(2, 0.92, 3.28), Segment(0, 4.0, 6.12)], [(7.04, 8.0)]),
              ("video_test_0000002", [Segment(2, 1.0 / 3.0, 2.5)], [])]
    write_annotations(tmp_path / "annotations", classes, "test", videos)
    write_class_list(tmp_path / "annotations", classes)
    for name, _, _ in videos:
        tiny_video(tmp_path / "test" / f"{name}.avi")
    index = load_detection_index(tmp_path, "test")
    assert index.classes == classes
    assert (tmp_path / "annotations" / "WaveFast_test.txt").read_text() == ""  # every class has its file
    read = {v.name: (sorted(v.segments, key=lambda s: s.start), v.ambiguous) for v in index.videos}
    assert read["video_test_0000001"] == ([Segment(2, 0.92, 3.28), Segment(0, 4.0, 6.12)], ((7.04, 8.0),))
    assert read["video_test_0000002"][0] == [Segment(2, 0.333, 2.5)]  # milliseconds


def test_check_decodes_every_video_and_lists_each_problem_with_its_source(copy: Path) -> None:
    (copy / "validation" / "video_validation_0000053.mp4").unlink()
    (copy / "validation" / "video_validation_0000052.mp4").write_bytes(b"")
    report = check_detection(copy, workers=1)
    assert report.videos == {"train": 2, "test": 1} and report.ambiguous == {"train": 2, "test": 0}
    assert report.segments == {"train": {"BaseballPitch": 2, "HighJump": 2}, "test": {"BaseballPitch": 1}}
    assert report.missing == [(copy / "validation" / "video_validation_0000053.mp4",
                               f"{copy / 'annotations' / 'Ambiguous_val.txt'}:2")]
    assert [path.name for path, _ in report.bad] == ["video_validation_0000052.mp4"]
    # The tiny videos last 0.6 s, so every segment of the readable ones ends past them.
    assert {(name, end) for name, end, _ in report.late} == {
        ("video_validation_0000051", 75.9), ("video_validation_0000051", 90.6), ("video_validation_0000051", 12.5),
        ("video_test_0000004", 1.1)}
    assert report.frame_counts == [6, 6] and report.fps == [10.0, 10.0] and not report.ok
    text = format_detection_report(report)
    assert "2 train (validation) and 1 test videos readable, 1 missing, 1 unreadable" in text
    assert any(line.split() == ["HighJump", "2", "0"] for line in text.splitlines())
    assert "segment past the end: video_test_0000004 ends at 1.1 s, the video at 0.60 s" in text


def test_data_check_gives_one_line_for_a_malformed_line(copy: Path, monkeypatch, capsys) -> None:
    bad = copy / "annotations" / "BaseballPitch_test.txt"
    bad.write_text("video_test_0000004 0.2 1.1\nvideo_test_0000004 1,5 2,0\n")
    monkeypatch.setattr(sys, "argv", ["kdhar", "data", "check", str(copy), "--dataset", "thumos14"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    assert exit_.value.code == 2 and out.out == ""
    assert out.err.strip().splitlines() == [
        f"Error: {bad}:2: expected '<video> <start> <end>' in seconds with 0 <= start <= end, "
        "got 'video_test_0000004 1,5 2,0'"]
