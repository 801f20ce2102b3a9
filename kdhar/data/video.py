"""Video file I/O: the only module that imports decord (reading) and PyAV (writing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(path: str | Path, frames: np.ndarray, fps: int = 25, codec: str = "mpeg4") -> None:
    """Encodes `frames` (T, H, W, 3) uint8 RGB into a real video file (AVI/MPEG-4 Part 2 by default,
    the codec family of UCF101's XviD files).

    The file is written to a temporary name and renamed, so an interrupted write never leaves a
    half-encoded video under the final name.
    """
    import av  # deferred: only dataset generation and benchmarks write videos

    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    height, width = frames.shape[1:3]
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        # High bitrate: the synthetic classes differ in small motions that heavy compression would blur.
        stream.bit_rate = max(200_000, width * height * fps * 2)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
