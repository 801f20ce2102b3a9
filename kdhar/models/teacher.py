"""A teacher: a frozen network and where it came from (a checkpoint, a logged model or a registry alias)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class Teacher:
    """A frozen teacher and where it came from."""

    model: nn.Module
    uri: str
    classes: list[str]
    arch: str | None = None
    run_id: str | None = None
    clip: tuple[int, int] | None = None  # (frames, crop) a logged teacher's graph takes; None: any
    normalize: str | None = None  # how the clips it was trained on were normalised; None: unknown
