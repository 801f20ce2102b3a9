"""A small student network: four 3x3x3 convolutions."""

from __future__ import annotations

from torch import Tensor, nn

from kdhar.models.c3d import SafeMaxPool3d, conv_bn_relu


class Tiny3DFeatures(nn.Module):
    """Four conv-BN-ReLU layers with `width`, 2x, 4x, 4x channels and a max-pool after each of the
    first three (the first keeps time, like C3D).

    At width 64 it has about 3.0 M parameters (C3D-BN: about 28 M), so it serves as a student
    that is clearly weaker than any teacher here.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.out_channels = c3
        self.layers = nn.Sequential(
            conv_bn_relu(3, c1),
            SafeMaxPool3d(pool_time=False),
            conv_bn_relu(c1, c2),
            SafeMaxPool3d(),
            conv_bn_relu(c2, c3),
            SafeMaxPool3d(),
            conv_bn_relu(c3, c3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def tiny3d_features(width: int = 64) -> Tiny3DFeatures:
    """The four-layer student trunk at the given base width."""
    return Tiny3DFeatures(width)
