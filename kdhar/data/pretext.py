"""PCL's 5-way pretext transforms of a tuple's middle clip (VCP), on (C, T, H, W) tensors.

Labels (see `kdhar.data.tuples`): 0 unchanged; 1 rotated by 90, 180 or 270 degrees (one label for
all three); 2 quadrants rearranged, A=top-left, B=top-right, C=bottom-left, D=bottom-right, as
[[D, C], [B, A]] (upstream, `spatial_perm="fixed"`) or a uniform non-identity permutation
(`"random"`, the paper's prose); 3 two of the four temporal chunks (`torch.chunk`, so 3/3/3/1
frames at T=10) swapped, any two (upstream, `swap_pairs="any"`) or neighbours only
(`"adjacent"`); 4 the clip replaced by the remote clip (done by the loader, nothing to do here).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from kdhar.config import SPATIAL_PERMS, SWAP_PAIRS

FIXED_QUADRANTS = (3, 2, 1, 0)  # [[D, C], [B, A]] from quadrants numbered A=0, B=1, C=2, D=3
_NON_IDENTITY = [p for p in itertools.permutations(range(4)) if p != (0, 1, 2, 3)]


def rotate(clip: Tensor, quarter_turns: int) -> Tensor:
    """Every frame rotated by `quarter_turns` x 90 degrees over (H, W)."""
    return torch.rot90(clip, quarter_turns, dims=(2, 3))


def permute_quadrants(clip: Tensor, order: tuple[int, int, int, int]) -> Tensor:
    """Reassembles the four quadrants (A, B, C, D = 0..3, row-major) so that position i shows
    quadrant order[i]; quadrant contents are not rotated. H and W must be even."""
    h, w = clip.shape[-2] // 2, clip.shape[-1] // 2
    quads = [clip[..., :h, :w], clip[..., :h, w:], clip[..., h:, :w], clip[..., h:, w:]]
    top = torch.cat([quads[order[0]], quads[order[1]]], dim=-1)
    bottom = torch.cat([quads[order[2]], quads[order[3]]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def swap_chunks(clip: Tensor, i: int, j: int) -> Tensor:
    """Swaps temporal chunks i and j of `torch.chunk(clip, 4, dim=1)`."""
    chunks = list(torch.chunk(clip, 4, dim=1))
    chunks[i], chunks[j] = chunks[j], chunks[i]
    return torch.cat(chunks, dim=1)


def draw_swap(rng: np.random.Generator, pairs: str = "any") -> tuple[int, int]:
    """Upstream's draw, i ~ U{0..3} and j = (i + U{1..3}) mod 4 (all six pairs equally likely), or
    one of the three neighbouring pairs."""
    if pairs == "adjacent":
        i = int(rng.integers(0, 3))
        return i, i + 1
    i = int(rng.integers(0, 4))
    return i, (i + int(rng.integers(1, 4))) % 4


def transform(clip: Tensor, label: int, rng: np.random.Generator, spatial_perm: str = "fixed",
              swap_pairs: str = "any") -> Tensor:
    """The middle clip as the pretext label `label` (0-3) wants it; label 4 is returned unchanged
    (its clip was already replaced by the remote one)."""
    if spatial_perm not in SPATIAL_PERMS:
        raise ValueError(f"spatial_perm {spatial_perm!r}: choose one of {', '.join(SPATIAL_PERMS)}")
    if swap_pairs not in SWAP_PAIRS:
        raise ValueError(f"swap_pairs {swap_pairs!r}: choose one of {', '.join(SWAP_PAIRS)}")
    if label == 1:
        return rotate(clip, int(rng.integers(1, 4)))
    if label == 2:
        order = FIXED_QUADRANTS if spatial_perm == "fixed" else _NON_IDENTITY[int(rng.integers(0, len(_NON_IDENTITY)))]
        return permute_quadrants(clip, order)
    if label == 3:
        return swap_chunks(clip, *draw_swap(rng, swap_pairs))
    return clip


__all__ = ["SPATIAL_PERMS", "SWAP_PAIRS", "FIXED_QUADRANTS", "rotate", "permute_quadrants", "swap_chunks",
           "draw_swap", "transform"]
