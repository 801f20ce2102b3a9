"""Atomic checkpoint files holding everything a resume needs, as plain types and tensors."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kdhar.disk import DiskFullError, disk_full


# A checkpoint is written to ".<name>.<random>.tmp" beside it, then renamed over it.
TEMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


class CheckpointDiskFull(CheckpointError, DiskFullError):
    """The disk filled up while a checkpoint was written; the previous one is intact."""


@contextlib.contextmanager
def _signals_deferred(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Holds SIGTERM/SIGINT back until the block is done, then delivers them to the handlers that
    were in place (a run's tracker ends the run KILLED). A signal raised inside torch.save broke the
    archive writer, which turned it into a RuntimeError and the run into a FAILED one."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received:
            signal.raise_signal(s)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Writes `state` to `path` so that `path` always holds a complete checkpoint.

    The state goes to a temporary file in the same directory, is flushed to disk, read back with
    `weights_only=True` (so a state that could not be resumed is rejected now, not at resume time),
    and only then renamed over `path`. A failure at any point leaves the previous file untouched.
    SIGTERM and SIGINT wait until the write is done.

    Raises:
        CheckpointError: `state` holds something other than plain types and tensors, or the disk
            is full (the previous checkpoint stays as it was).
    """
    with _signals_deferred():
        _save(Path(path), state)


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            # mmap: only the pickled structure is checked, the tensor bytes are not read again.
            torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: not saved, the state cannot be loaded with weights_only=True ({_reason(e)}); "
                "store only plain types and tensors"
            ) from e
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if disk_full(exc):  # torch.save reports it as a RuntimeError whose context is the OSError
            then = (f"the previous one ({path}) is intact; free space and resume with --resume {path}"
                    if path.exists() else "there was no earlier one; free space and run again")
            raise CheckpointDiskFull(f"disk full at {path.parent}: checkpoint not written, {then}") from exc
        raise
    # Persist the rename itself, so a power cut cannot bring back the old directory entry.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_partial_writes(path: str | Path) -> list[Path]:
    """Deletes the temporary files of `path` (".<name>.<random>.tmp" beside it) that writes killed
    outright left behind (SIGKILL, out of memory, power loss), and returns them. Only the process
    that owns `path` may call it (a run's own checkpoint): another process's write in progress
    would lose its file.

    Nothing ever reads such a file, so one left behind is harmless; it only holds disk space.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    partial = sorted(p for p in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}") if p.is_file())
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by `save_checkpoint` (with `weights_only=True`).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or holds non-plain objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: unreadable checkpoint, truncated or corrupt ({_reason(e)}); delete it to start afresh"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of training state, found {type(state).__name__}")
    return state


def _reason(error: BaseException) -> str:
    # torch's weights_only errors are paragraphs of advice; keep only the part that names the cause.
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it contains a {found.group(1)} object"
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if found:
        return f"not a torch checkpoint: {found.group(1).strip()}"
    first_line = text.strip().splitlines()[0] if text.strip() else "no details"
    return f"{type(error).__name__}: {first_line}"
