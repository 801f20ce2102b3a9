"""C3D with batch normalisation: eight 3x3x3 convolutions, as in self-supervised video work (VCOP, PCL)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 3x3x3 convolution followed by batch norm and ReLU (the conv has no bias: BN supplies it)."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class SafeMaxPool3d(nn.Module):
    """2x max-pooling that never shrinks a dimension below 1.

    Classic C3D pools time with floor division, so a 10-frame clip reaches zero frames before the
    last block. Here every pooled dimension rounds up (ceil_mode) and a dimension that is already 1
    is left alone, so any clip length and crop size >= 1 reaches the head.
    """

    def __init__(self, pool_time: bool = True) -> None:
        super().__init__()
        self.pool_time = pool_time

    def forward(self, x: Tensor) -> Tensor:
        t, h, w = x.shape[-3:]
        kernel = (2 if self.pool_time and t > 1 else 1, 2 if h > 1 else 1, 2 if w > 1 else 1)
        return F.max_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)


class C3DFeatures(nn.Module):
    """C3D-BN trunk: conv1, conv2, conv3a/b, conv4a/b, conv5a/b with max-pooling between stages.

    `width` is the first layer's channel count; the published network (width 64) has
    64, 128, 256, 256, 512, 512, 512, 512 channels. The published pool5 and fc6/fc7 are replaced by
    the classifier head's global average pooling, as in VCOP/PCL.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        c1, c2, c3, c4 = width, 2 * width, 4 * width, 8 * width
        self.out_channels = c4
        self.layers = nn.Sequential(
            conv_bn_relu(3, c1),
            SafeMaxPool3d(pool_time=False),  # keep early temporal detail, as C3D does
            conv_bn_relu(c1, c2),
            SafeMaxPool3d(),
            conv_bn_relu(c2, c3),
            conv_bn_relu(c3, c3),
            SafeMaxPool3d(),
            conv_bn_relu(c3, c4),
            conv_bn_relu(c4, c4),
            SafeMaxPool3d(),
            conv_bn_relu(c4, c4),
            conv_bn_relu(c4, c4),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def c3d_features(width: int = 64) -> C3DFeatures:
    """The C3D-BN trunk at the given base width."""
    return C3DFeatures(width)


__all__ = ["C3DFeatures", "SafeMaxPool3d", "c3d_features", "conv_bn_relu"]
