"""Split-file parsing (real UCF101 lists, HMDB51, folder + manifest), missing videos, fingerprints
and training subsets."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from kdhar.data.index import (
    DatasetError,
    MissingVideosError,
    SplitFileError,
    VideoSample,
    fingerprint,
    load_index,
)
from kdhar.data.subsets import class_balanced_subset, group_holdout

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucf101"


def touch(path: Path, content: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def write_crlf(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + "\r\n" for line in lines).encode())


def tiny_ucf(root: Path, split_sub: str = "") -> Path:
    """Two classes, train groups g08/g09 and test group g01, in the official file formats."""
    lists = root / split_sub
    write_crlf(lists / "classInd.txt", ["1 Archery", "2 YoYo"])
    train = [
        f"{c}/v_{c}_g{g:02d}_c0{k}.avi {i + 1}"
        for i, c in enumerate(["Archery", "YoYo"])
        for g in (8, 9)
        for k in (1, 2)
    ]
    test = [f"{c}/v_{c}_g01_c01.avi" for c in ["Archery", "YoYo"]]
    write_crlf(lists / "trainlist01.txt", train)
    write_crlf(lists / "testlist01.txt", test)
    for line in train + test:
        touch(root / line.split()[0])
    return root


# --- UCF101 ------------------------------------------------------------------------------------


def test_class_subset_keeping_official_numbers_and_sibling_split_folder(tmp_path: Path, caplog) -> None:
    # As the two official downloads unpack: UCF-101/ (videos) beside ucfTrainTestlist/, here with a
    # subset of classes that keeps their official numbers (1 ApplyEyeMakeup, 5 Archery, 101 YoYo).
    root, lists = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    write_crlf(lists / "classInd.txt", ["1 ApplyEyeMakeup", "5 Archery", "101 YoYo"])
    train = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1", "Archery/v_Archery_g08_c01.avi 5",
             "YoYo/v_YoYo_g09_c01.avi 101"]
    write_crlf(lists / "trainlist01.txt", train)
    write_crlf(lists / "testlist01.txt", ["YoYo/v_YoYo_g01_c01.avi"])
    for line in train + ["YoYo/v_YoYo_g01_c01.avi"]:
        touch(root / line.split()[0])
    with caplog.at_level("WARNING", logger="kdhar.data.index"):
        index = load_index("ucf101", root, 1, "train")
        load_index("ucf101", root, 1, "test")
    assert index.classes == ["ApplyEyeMakeup", "Archery", "YoYo"]
    assert [s.label for s in index.samples] == [0, 1, 2]  # mapped in the file's order
    assert sum("with gaps" in r.getMessage() for r in caplog.records) == 1  # said once
    write_crlf(lists / "trainlist01.txt", ["Archery/v_Archery_g08_c01.avi 2"])  # not Archery's number
    with pytest.raises(SplitFileError, match="number 5"):
        load_index("ucf101", root, 1, "train")
    write_crlf(lists / "classInd.txt", ["5 Archery", "1 ApplyEyeMakeup"])  # numbers must rise
    with pytest.raises(SplitFileError, match="rising"):
        load_index("ucf101", root, 1, "train")


@pytest.mark.parametrize("subset,count", [("train", 9537), ("test", 3783)])
def test_real_ucf101_split_files(tmp_path: Path, subset: str, count: int) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    assert b"\r\n" in (SHARED / "trainlist01.txt").read_bytes()  # parsed as published, CRLF
    index = load_index("ucf101", tmp_path, 1, subset, on_missing="skip", split_dir=SHARED)
    assert index.samples == [] and index.missing == count
    assert len(index.classes) == 101
    assert index.classes[0] == "ApplyEyeMakeup" and index.classes[-1] == "YoYo"
    assert all("\r" not in name for name in index.classes)
    # The same listing with the files present: labels 0-based, groups as the paper's split defines.
    root = tmp_path / "videos"
    shutil.copytree(SHARED, root, ignore=shutil.ignore_patterns("videos"))
    listed = (SHARED / f"{subset}list01.txt").read_text().split()
    for rel in (r for r in listed if r.endswith(".avi")):
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).touch()
    index = load_index("ucf101", root, 1, subset)
    assert len(index.samples) == count and index.missing == 0
    labels = Counter(s.label for s in index.samples)
    assert sorted(labels) == list(range(101))
    first = index.samples[0]
    assert first.label == 0 and first.path.parent.name == "ApplyEyeMakeup"
    groups = {s.group for s in index.samples}
    expected = range(8, 26) if subset == "train" else range(1, 8)  # split 1 tests on g01-g07
    assert groups == {f"g{g:02d}" for g in expected}
    handstand = [s for s in index.samples if "HandStandPushups" in s.path.name]
    assert handstand and {index.classes[s.label] for s in handstand} == {"HandstandPushups"}


def test_ucf101_split_file_lookup_and_labels(tmp_path: Path) -> None:
    root = tiny_ucf(tmp_path / "ucf", split_sub="ucfTrainTestlist")
    train = load_index("ucf101", root, 1, "train")
    test = load_index("ucf101", root, 1, "test")
    assert train.classes == ["Archery", "YoYo"]
    assert [s.label for s in train.samples] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {s.group for s in train.samples} == {"g08", "g09"}
    assert [(s.path.name, s.label, s.group) for s in test.samples] == [
        ("v_Archery_g01_c01.avi", 0, "g01"),
        ("v_YoYo_g01_c01.avi", 1, "g01"),
    ]
    with pytest.raises(SplitFileError, match="trainlist02.txt not found"):
        load_index("ucf101", root, 2, "train")


def test_ucf101_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    root = tiny_ucf(tmp_path)
    lines = (root / "trainlist01.txt").read_text().splitlines()
    lines[2] = "Archery/v_Archery_g09_c01.avi"  # label dropped
    write_crlf(root / "trainlist01.txt", lines)
    with pytest.raises(SplitFileError, match=r"trainlist01.txt:3: expected"):
        load_index("ucf101", root, 1, "train")
    lines[2] = "Archery/v_Archery_g09_c01.avi 2"  # label of the other class
    write_crlf(root / "trainlist01.txt", lines)
    with pytest.raises(SplitFileError, match=r"trainlist01.txt:3: label 2 does not match"):
        load_index("ucf101", root, 1, "train")


def test_missing_videos_error_then_skip(tmp_path: Path) -> None:
    root = tiny_ucf(tmp_path)
    for name in ["v_YoYo_g08_c01.avi", "v_YoYo_g09_c02.avi"]:
        (root / "YoYo" / name).unlink()
    with pytest.raises(MissingVideosError) as info:
        load_index("ucf101", root, 1, "train")
    message = str(info.value)
    assert "2 of 8" in message and "v_YoYo_g08_c01.avi" in message and "on_missing='skip'" in message
    index = load_index("ucf101", root, 1, "train", on_missing="skip")
    assert len(index.samples) == 6 and index.missing == 2
    with pytest.raises(DatasetError, match="on_missing"):
        load_index("ucf101", root, 1, "train", on_missing="ignore")


def test_unknown_dataset_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'kinetics'"):
        load_index("kinetics", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_index("ucf101", tmp_path / "absent")


def test_split_files_as_users_break_them_name_the_file(tmp_path: Path) -> None:
    root = tiny_ucf(tmp_path / "ucf")
    (root / "trainlist01.txt").write_text("")
    with pytest.raises(SplitFileError, match=r"trainlist01.txt is empty"):
        load_index("ucf101", root, subset="train")
    (root / "trainlist01.txt").write_text("Archery/v_Archery_g08_c01.avi 1\n", encoding="utf-16")
    with pytest.raises(SplitFileError, match=r"trainlist01.txt: not UTF-8 text .*save it as UTF-8"):
        load_index("ucf101", root, subset="train")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        load_index("ucf101", tmp_path / "a_file")


# --- HMDB51 and folders ------------------------------------------------------------------------


def test_hmdb51_splits(tmp_path: Path) -> None:
    splits = tmp_path / "testTrainMulti_7030_splits"
    for name, rows in {"wave": ["a.avi 1", "b.avi 2", "c.avi 0"], "brush_hair": ["d.avi 2 ", "e.avi 1"]}.items():
        write_crlf(splits / f"{name}_test_split1.txt", rows)
        for row in rows:
            touch(tmp_path / name / row.split()[0])
    train = load_index("hmdb51", tmp_path, 1, "train")
    test = load_index("hmdb51", tmp_path, 1, "test")
    assert train.classes == ["brush_hair", "wave"]  # sorted by name
    assert [(s.path.name, s.label, s.group) for s in train.samples] == [("e.avi", 0, "e"), ("a.avi", 1, "a")]
    assert [s.path.name for s in test.samples] == ["d.avi", "b.avi"]
    write_crlf(splits / "wave_test_split1.txt", ["a.avi 1", "b.avi 3"])
    with pytest.raises(SplitFileError, match=r"wave_test_split1.txt:2"):
        load_index("hmdb51", tmp_path, 1, "train")
    with pytest.raises(SplitFileError, match="_test_split2.txt"):
        load_index("hmdb51", tmp_path, 2, "train")


def test_folder_with_manifest(tmp_path: Path) -> None:
    for rel in ["run/r1.mp4", "run/r2.mp4", "walk/w1.mkv", "walk/w2.mkv"]:
        touch(tmp_path / rel)
    (tmp_path / "manifest.csv").write_text(
        "path,label,split,group\nrun/r1.mp4,run,train,p1\nrun/r2.mp4,run,test,p2\n"
        "walk/w1.mkv,walk,train,p1\nwalk/w2.mkv,walk,test,p2\n"
    )
    train = load_index("folder", tmp_path, 1, "train")
    assert train.classes == ["run", "walk"]
    assert [(s.path.name, s.label, s.group) for s in train.samples] == [("r1.mp4", 0, "p1"), ("w1.mkv", 1, "p1")]
    assert [s.path.name for s in load_index("folder", tmp_path, 1, "test").samples] == ["r2.mp4", "w2.mkv"]
    (tmp_path / "manifest.csv").write_text("path,label,split\nrun/r1.mp4,run,val\n")
    with pytest.raises(SplitFileError, match=r"manifest.csv:2: split must be"):
        load_index("folder", tmp_path, 1, "train")


def test_folder_without_manifest_splits_by_group(tmp_path: Path) -> None:
    for c in ["a", "b", "c"]:
        for k in range(20):
            touch(tmp_path / c / f"{c}{k}.avi")
    touch(tmp_path / "a" / "notes.txt")
    touch(tmp_path / "a" / ".a99.tmp.avi")  # an interrupted write, not a video
    train = load_index("folder", tmp_path, 1, "train")
    test = load_index("folder", tmp_path, 1, "test")
    assert len(train.samples) + len(test.samples) == 60
    assert not {s.group for s in train.samples} & {s.group for s in test.samples}
    assert 0.15 < len(test.samples) / 60 < 0.45
    assert train == load_index("folder", tmp_path, 1, "train")  # deterministic
    assert {s.path for s in load_index("folder", tmp_path, 2, "test").samples} != {s.path for s in test.samples}


def test_fingerprint_tracks_content_not_location(tmp_path: Path) -> None:
    root = tiny_ucf(tmp_path / "one")
    first = fingerprint(load_index("ucf101", root, 1, "train"))
    assert len(first) == 12
    moved = shutil.copytree(root, tmp_path / "two")
    assert fingerprint(load_index("ucf101", moved, 1, "train")) == first
    (moved / "YoYo" / "v_YoYo_g08_c01.avi").write_bytes(b"longer content")
    assert fingerprint(load_index("ucf101", moved, 1, "train")) != first


def test_fingerprint_sees_a_file_rewritten_at_the_same_size(tmp_path: Path) -> None:
    root = tiny_ucf(tmp_path / "one")
    index = load_index("ucf101", root, 1, "train")
    first = fingerprint(index)
    path = index.samples[0].path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the same size, one byte of its tail changed
    path.write_bytes(bytes(data))
    assert fingerprint(load_index("ucf101", root, 1, "train")) != first
    data[0] ^= 0xFF
    data[-1] ^= 0xFF  # back at the tail, changed at the head
    path.write_bytes(bytes(data))
    assert fingerprint(load_index("ucf101", root, 1, "train")) != first


# --- subsets ----------------------------------------------------------------------------------


def many_samples() -> list[VideoSample]:
    sizes = {0: 100, 1: 40, 2: 7}
    return [
        VideoSample(Path(f"/d/c{label}/v{k}.avi"), label, f"g{k % 10:02d}")
        for label, n in sizes.items()
        for k in range(n)
    ]


def test_class_balanced_subset_is_balanced_and_keeps_every_class() -> None:
    samples = many_samples()
    counts = Counter(s.label for s in class_balanced_subset(samples, 0.25, seed=0))
    assert counts == {0: 25, 1: 10, 2: 2}
    assert Counter(s.label for s in class_balanced_subset(samples, 0.02, seed=0)) == {0: 2, 1: 1, 2: 1}
    assert class_balanced_subset(samples, 1.0, seed=3) == samples


def test_class_balanced_subset_deterministic_and_nested() -> None:
    samples = many_samples()
    a = class_balanced_subset(samples, 0.25, seed=7)
    assert a == class_balanced_subset(list(reversed(samples)), 0.25, seed=7)[::-1]
    assert a != class_balanced_subset(samples, 0.25, seed=8)
    previous = set(samples)
    for fraction in (1.0, 0.5, 0.25, 0.02):
        current = set(class_balanced_subset(samples, fraction, seed=7))
        assert current <= previous
        previous = current


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_class_balanced_subset_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=str(fraction)):
        class_balanced_subset(many_samples(), fraction, seed=0)


def test_group_holdout_holds_out_whole_groups() -> None:
    samples = many_samples()
    train, val = group_holdout(samples, 0.2, seed=0)
    assert len(train) + len(val) == len(samples)
    assert len({s.group for s in val}) == 2
    assert not {s.group for s in train} & {s.group for s in val}
    assert (train, val) == group_holdout(samples, 0.2, seed=0)
    assert group_holdout(samples, 0.0, seed=0) == (samples, [])
    with pytest.raises(ValueError, match="1.0"):
        group_holdout(samples, 1.0, seed=0)
    with pytest.raises(ValueError, match="1 group"):
        group_holdout([samples[0]], 0.5, seed=0)
