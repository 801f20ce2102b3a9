"""Decoding real encoded files with decord, and every way a video file can be broken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdhar.data.video import VideoError, frame_count, read_frames, write_video

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucf101"
REAL_CLIP = SHARED / "videos" / "BabyCrawling" / "sample_BabyCrawling.avi"


def moving_frames(n: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Blocky random texture sliding right: gives the encoder real content and motion."""
    texture = np.random.default_rng(seed).integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    texture = texture.repeat(4, axis=0).repeat(4, axis=1)
    return np.stack([np.roll(texture, 2 * t, axis=1) for t in range(n)])


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    frames = moving_frames(30)
    path = tmp_path_factory.mktemp("video") / "ok.avi"
    write_video(path, frames)
    return path, frames


def test_real_ucf101_clip_decodes() -> None:
    if not REAL_CLIP.is_file():
        pytest.skip(f"{REAL_CLIP} not present")
    n = frame_count(REAL_CLIP)
    assert n > 100  # about 5 s at 25 fps
    frames = read_frames(REAL_CLIP, [0, n // 2, n - 1])
    assert frames.shape == (3, 240, 320, 3) and frames.dtype == np.uint8
    assert frames.std() > 10  # real picture content, not a blank decode
    small = read_frames(REAL_CLIP, [0, 1], size=(128, 171))
    assert small.shape == (2, 128, 171, 3)


def test_frames_match_what_was_written(video: tuple[Path, np.ndarray]) -> None:
    path, written = video
    assert frame_count(path) == len(written)
    idx = [0, 7, 29]
    decoded = read_frames(path, idx)
    assert decoded.shape == (3, 48, 64, 3)
    # Lossy codec: close to the source frame, and clearly further from a different frame.
    err = np.abs(decoded.astype(int) - written[idx].astype(int)).mean(axis=(1, 2, 3))
    assert (err < 12).all(), err
    assert np.abs(decoded[1].astype(int) - written[20].astype(int)).mean() > 2 * err[1]


def test_indices_are_clamped_and_order_kept(video: tuple[Path, np.ndarray]) -> None:
    path, _ = video
    frames = read_frames(path, [29, 5, 29, 100, -3])
    assert frames.shape[0] == 5
    np.testing.assert_array_equal(frames[0], frames[3])  # 100 -> last frame (29)
    np.testing.assert_array_equal(frames[0], frames[2])
    np.testing.assert_array_equal(frames[4], read_frames(path, [0])[0])
    assert not np.array_equal(frames[0], frames[1])


def test_decoder_resize(video: tuple[Path, np.ndarray]) -> None:
    path, _ = video
    assert read_frames(path, [0, 1], size=(24, 32)).shape == (2, 24, 32, 3)


def _bad_file(tmp_path: Path, video: tuple[Path, np.ndarray], kind: str) -> Path:
    data = video[0].read_bytes()
    path = tmp_path / f"{kind}.avi"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "bad_header":
        # The stream's codec tag (FourCC) replaced: the container parses but no decoder matches.
        path.write_bytes(data.replace(b"FMP4", b"ZZZZ"))
    elif kind == "corrupt_payload":
        # Header and index intact, compressed frames overwritten: opens, then fails to decode.
        body = bytearray(data)
        body[4000 : len(data) - 2000 : 7] = b"\xff" * len(range(4000, len(data) - 2000, 7))
        path.write_bytes(bytes(body))
    return path


@pytest.mark.parametrize("kind", ["empty", "garbage", "bad_header", "corrupt_payload"])
def test_broken_files_raise_video_error_naming_the_file(
    tmp_path: Path, video: tuple[Path, np.ndarray], kind: str
) -> None:
    path = _bad_file(tmp_path, video, kind)
    with pytest.raises(VideoError, match=f"{kind}.avi") as info:
        read_frames(path, [0, 1, 2])
    assert info.value.path == path
    assert "on_bad='skip'" in str(info.value)  # says what to do


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="not found"):
        frame_count(tmp_path / "nope.avi")


def test_truncated_file_reports_fewer_frames_and_reads_clamped(
    tmp_path: Path, video: tuple[Path, np.ndarray]
) -> None:
    data = video[0].read_bytes()
    path = tmp_path / "truncated.avi"
    path.write_bytes(data[: len(data) // 2])
    n = frame_count(path)
    assert 0 < n < 30
    frames = read_frames(path, list(range(0, 30, 3)))
    assert frames.shape == (10, 48, 64, 3)
    np.testing.assert_array_equal(frames[-1], read_frames(path, [n - 1])[0])


def test_video_error_survives_a_one_argument_rebuild() -> None:
    # DataLoader re-raises worker errors as type(exc)(message).
    original = VideoError("/data/x.avi", "broken")
    rebuilt = type(original)(f"Caught in worker. {original}")
    assert "x.avi" in str(rebuilt) and isinstance(rebuilt, VideoError)
