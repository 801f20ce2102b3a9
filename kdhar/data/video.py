"""Video file I/O: the only module that imports decord (reading) and PyAV (writing, and a stream's frame size).

Readers are opened inside each call and dropped before it returns. A decord `VideoReader` created in
a parent process and inherited by a forked DataLoader worker hangs, so nothing here is cached.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# One decoding thread per reader: DataLoader workers already run in parallel, and decord's default
# (0 = one thread per core) oversubscribes the machine as soon as there are two workers.
DECODE_THREADS = 1


class VideoError(Exception):
    """A video file that cannot be decoded. The message names the file and what to do about it."""

    def __init__(self, path: str | Path, reason: str | None = None) -> None:
        # DataLoader re-raises a worker's exception as `type(exc)(message)`; the one-argument form
        # keeps that message intact, so a bad file inside a worker still surfaces as a VideoError.
        self.path = Path(path) if reason is not None else None
        self.reason = reason
        if reason is None:
            super().__init__(str(path))
        else:
            super().__init__(
                f"{path}: {reason}. Re-download or re-encode this file, or leave bad videos out "
                f"with on_bad='skip'."
            )


class VideoFile:
    """An open video. Use as a context manager inside the process that reads it.

    Args:
        path: the video file.
        size: optional (height, width) the decoder scales every frame to.
    """

    def __init__(self, path: str | Path, size: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoError(self.path, "file not found")
        if self.path.stat().st_size == 0:
            raise VideoError(self.path, "file is empty (0 bytes), probably an interrupted download")
        import decord  # deferred: importing decord is slow and only readers need it

        self.scaled = size is not None
        try:
            self._reader = self._open(size)
        except (RuntimeError, decord.DECORDError) as exc:  # DECORDError is not a RuntimeError
            raise VideoError(self.path, f"cannot open as a video ({_first_line(exc)})") from exc
        self.num_frames = len(self._reader)
        if self.num_frames == 0:
            raise VideoError(self.path, "contains no decodable frames")
        # Frames per second as the container states it: untrimmed videos' annotations are in seconds.
        self.fps = float(self._reader.get_avg_fps())

    def _open(self, size: tuple[int, int] | None):
        import decord

        kwargs = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
        return decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=DECODE_THREADS, **kwargs)

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Decodes the frames at `indices` (clamped to the real length) as uint8 (T, H, W, 3)."""
        import decord

        idx = np.clip(np.asarray(indices, dtype=np.int64), 0, self.num_frames - 1)
        if idx.size == 0:
            raise ValueError(f"{self.path}: no frame indices given")
        # Decode each distinct frame once, in order; short videos repeat their last frame many times.
        unique, inverse = np.unique(idx, return_inverse=True)
        try:
            frames = self._reader.get_batch(unique.tolist()).asnumpy()
        except (RuntimeError, decord.DECORDError) as exc:
            if self.scaled and "exactly match" in str(exc):
                # decord's scaler fails for some output sizes; decode at the native size instead
                # (callers resize anyway when the frames are not the size they asked for).
                self._reader, self.scaled = self._open(None), False
                return self.read(indices)
            raise VideoError(
                self.path,
                f"decoding failed, the file is probably truncated or corrupt ({_first_line(exc)})",
            ) from exc
        return frames[inverse.reshape(-1)]

    def close(self) -> None:
        del self._reader

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def frame_count(path: str | Path) -> int:
    """Returns the number of frames the decoder can index in `path`.

    Raises:
        VideoError: the file is missing, empty or not a decodable video.
    """
    with VideoFile(path) as video:
        return video.num_frames


def video_info(path: str | Path) -> tuple[int, float]:
    """Returns (frames the decoder can index, frames per second) of `path`.

    Raises:
        VideoError: the file is missing, empty or not a decodable video.
    """
    with VideoFile(path) as video:
        return video.num_frames, video.fps


def frame_size(path: str | Path) -> tuple[int, int]:
    """Returns (height, width) of the frames stored in `path`, from the stream's header.

    PyAV reads the header without decoding: decord decodes some widths (48, say) only when it
    scales the frames, and its reader has no size of its own.

    Raises:
        VideoError: the file is missing or has no video stream.
    """
    import av  # deferred, as for writing

    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "file not found")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return int(stream.height), int(stream.width)
    except (av.error.FFmpegError, IndexError) as exc:
        raise VideoError(path, f"cannot open as a video ({_first_line(exc)})") from exc


def read_frames(
    path: str | Path, indices: Sequence[int] | np.ndarray, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decodes frames `indices` of `path` as uint8 RGB (T, H, W, 3).

    Indices past the end are clamped to the last real frame: truncated files often report fewer
    frames than the clip expects.

    Args:
        path: the video file.
        indices: frame numbers, any order, repeats allowed.
        size: optional (height, width) the decoder scales to. On 320x240 MPEG-4 this costs the same
            CPU as resizing afterwards and loads faster with DataLoader workers
            (benchmarks/bench_loader.py).

    Raises:
        VideoError: the file is missing, empty, truncated or not decodable.
    """
    with VideoFile(path, size) as video:
        return video.read(indices)


def _first_line(exc: BaseException) -> str:
    # decord puts a C++ source location and a stack trace into its messages; the first line
    # carries the actual reason.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int = 25,
    codec: str = "mpeg4",
    bit_rate: int | None = None,
    gop_size: int | None = None,
) -> None:
    """Encodes `frames` (T, H, W, 3) uint8 RGB into a real video file (AVI/MPEG-4 Part 2 by default,
    the codec family of UCF101's XviD files).

    The file is written to a temporary name of its own and renamed, so an interrupted write never
    leaves a half-encoded video under the final name, and two processes writing the same video
    (two `kdhar data synth` on one folder) each finish their own file instead of sharing one.

    Args:
        bit_rate: bits per second; by default high enough to keep small motions sharp.
        gop_size: frames between keyframes (encoder default if None). UCF101's files have a single
            keyframe, which makes seeking cost a decode from the start.
    """
    import av  # deferred: only dataset generation and benchmarks write videos

    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    height, width = frames.shape[1:3]
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            # High bitrate: the synthetic classes differ in small motions that heavy compression would blur.
            stream.bit_rate = bit_rate if bit_rate is not None else max(200_000, width * height * fps * 2)
            if gop_size is not None:
                stream.gop_size = gop_size
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_name(path: Path) -> Path:
    """A hidden name beside `path` that no other writer uses (`.name.<random>.tmp.ext`): the file is
    written there and renamed over `path` once complete. The extension stays last, so an encoder
    still knows the format from it."""
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


def is_temp_name(path: Path) -> bool:
    """Whether `path` is a file `temp_name` made (a write in progress, or one a killed writer left)."""
    return path.name.startswith(".") and ".tmp" in path.name
