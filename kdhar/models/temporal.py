"""How far a trunk shrinks time: its temporal downsamplings, and `keep_time`, which leaves out the
last of them so the last feature map keeps a time axis.

At the CPU preset's 8-frame clips C3D, R3D-18, R(2+1)D-18 and the 10-layer ResNets halve time three
times and end at T' = 1, so an attention over the last feature's time axis (GKD's, channel x time)
has no time left to attend to. Leaving out the last two halvings keeps T' = 4 there, as the paper's
I3D keeps T' = 8 of 64 frames, without longer clips. The spatial strides stay, and so does every
weight: only the stride of the layers that halved time changes, so parameter counts are unchanged.
"""

from __future__ import annotations

from torch import nn

from kdhar.models.c3d import SafeMaxPool3d


def _units(trunk: nn.Module) -> list[nn.Module]:
    """The trunk's layers in input order: its children, a Sequential's items one by one (C3D's convs
    and pools, a ResNet stage's blocks)."""
    out: list[nn.Module] = []
    for child in trunk.children():
        out.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return out


def _time_strided(unit: nn.Module) -> list[nn.Module]:
    """The convolutions and pools of one unit that halve time (a block's convolution and its shortcut
    projection together are one halving)."""
    return [m for m in unit.modules()
            if (isinstance(m, nn.Conv3d) and m.stride[0] > 1) or (isinstance(m, SafeMaxPool3d) and m.pool_time)]


def time_downsamplings(trunk: nn.Module) -> int:
    """How many times the trunk halves time (C3D and the ResNets 3, tiny3d 2, MC3-18 0)."""
    return sum(1 for unit in _units(trunk) if _time_strided(unit))


def keep_time(trunk: nn.Module, n: int) -> nn.Module:
    """Leaves out the trunk's last `n` temporal downsamplings (all of them when it has fewer), in place.

    Their spatial strides stay; a convolution keeps its kernel and padding, so time keeps its length
    through it. Returns the trunk.

    Raises:
        ValueError: n < 0.
    """
    if n < 0:
        raise ValueError(f"keep_time must be >= 0 (the number of last temporal downsamplings left out), got {n}")
    strided = [unit for unit in _units(trunk) if _time_strided(unit)]
    for unit in strided[max(0, len(strided) - n):]:
        for m in _time_strided(unit):
            if isinstance(m, SafeMaxPool3d):
                m.pool_time = False
            else:
                m.stride = (1, *m.stride[1:])
    return trunk


__all__ = ["keep_time", "time_downsamplings"]
