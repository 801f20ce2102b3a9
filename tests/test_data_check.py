"""`check_dataset` scans every listed video in a process pool and reports missing and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdhar.data.check import check_dataset, format_report
from kdhar.data.video import write_video


def moving_frames(n: int, seed: int) -> np.ndarray:
    texture = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    return np.stack([np.roll(texture, t, axis=1) for t in range(n)])


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny UCF101 layout: 5 good videos, one empty, one garbage, one missing."""
    root = tmp_path_factory.mktemp("ucf")
    (root / "classInd.txt").write_bytes(b"1 Archery\r\n2 YoYo\r\n")
    train = [
        "Archery/v_Archery_g08_c01.avi 1",
        "Archery/v_Archery_g09_c01.avi 1",
        "YoYo/v_YoYo_g08_c01.avi 2",
        "YoYo/v_YoYo_g09_c01.avi 2",
        "YoYo/v_YoYo_g10_c01.avi 2",
    ]
    test = ["Archery/v_Archery_g01_c01.avi", "YoYo/v_YoYo_g01_c01.avi", "YoYo/v_YoYo_g02_c01.avi"]
    (root / "trainlist01.txt").write_bytes("".join(f"{line}\r\n" for line in train).encode())
    (root / "testlist01.txt").write_bytes("".join(f"{line}\r\n" for line in test).encode())
    for k, rel in enumerate([line.split()[0] for line in train[:4]] + test[:1]):
        write_video(root / rel, moving_frames(10 + k, seed=k))
    (root / "YoYo" / "v_YoYo_g10_c01.avi").write_bytes(b"")
    (root / "YoYo" / "v_YoYo_g01_c01.avi").write_bytes(np.random.default_rng(0).bytes(3000))
    return root  # YoYo/v_YoYo_g02_c01.avi is listed but never written


def test_check_reports_counts_missing_and_bad(ucf_root: Path) -> None:
    report = check_dataset(ucf_root, "ucf101", split=1, workers=2)
    assert report.classes == ["Archery", "YoYo"]
    assert report.counts == {"train": {"Archery": 2, "YoYo": 2}, "test": {"Archery": 1, "YoYo": 0}}
    assert report.missing == [ucf_root / "YoYo" / "v_YoYo_g02_c01.avi"]
    bad = {path.name: reason for path, reason in report.bad}
    assert set(bad) == {"v_YoYo_g10_c01.avi", "v_YoYo_g01_c01.avi"}
    assert "empty" in bad["v_YoYo_g10_c01.avi"]
    assert sorted(report.frame_counts) == [10, 11, 12, 13, 14]
    assert not report.ok

    text = format_report(report)
    assert "5 readable, 1 missing, 2 unreadable" in text
    assert "min 10, median 12, max 14" in text
    assert f"missing: {ucf_root / 'YoYo' / 'v_YoYo_g02_c01.avi'}" in text
    assert f"unreadable: {ucf_root / 'YoYo' / 'v_YoYo_g01_c01.avi'}:" in text
    assert any(line.split() == ["Archery", "2", "1"] for line in text.splitlines())


def test_clean_dataset_is_ok(tmp_path: Path) -> None:
    for c in ("jump", "run"):
        for k in range(3):
            write_video(tmp_path / c / f"{c}{k}.avi", moving_frames(6, seed=k))
    report = check_dataset(tmp_path, "folder", workers=1)
    assert report.ok
    assert sum(sum(c.values()) for c in report.counts.values()) == 6
    assert "Re-download" not in format_report(report)


def test_data_check_without_split_files_explains_the_layouts(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kdhar.cli", "data", "check", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("Error: split file classInd.txt not found") and "--split-dir" in lines[0]
    assert "kdhar reads these layouts:" in lines[1]
    assert [line.split(":")[0].strip() for line in lines[2:]] == ["UCF101", "HMDB51", "folder", "THUMOS14"]


def test_data_check_reports_progress_and_reads_split_files_from_split_dir(tmp_path: Path) -> None:
    seen = []
    root = tmp_path / "videos"
    for name in ("a", "b"):
        write_video(root / name / "x.avi", np.zeros((4, 32, 32, 3), np.uint8), fps=5)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "manifest.csv").write_text("path,label,split\na/x.avi,a,train\nb/x.avi,b,test\n")
    report = check_dataset(root, "folder", workers=1, split_dir=tmp_path / "lists", on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)] and not report.bad and not report.missing
