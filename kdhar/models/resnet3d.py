"""R3D-18, MC3-18 and R(2+1)D-18 trunks built from torchvision's video ResNet blocks, with a width knob.

torchvision hard-codes 64/128/256/512 channels; these trunks scale them with `width` and reuse
torchvision's blocks, convolution strategies and layer builder, so at width 64 the networks are
exactly torchvision's `r3d_18`, `mc3_18` and `r2plus1d_18` (same parameter count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torchvision.models.video.resnet import (
    BasicBlock,
    Conv2Plus1D,
    Conv3DNoTemporal,
    Conv3DSimple,
    VideoResNet,
)


def basic_stem(width: int) -> nn.Sequential:
    """torchvision's `BasicStem` with `width` output channels."""
    return nn.Sequential(
        nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


def r2plus1d_stem(width: int) -> nn.Sequential:
    """torchvision's `R2Plus1dStem` with `width` output channels (45 mid channels at width 64)."""
    mid = max(1, round(45 * width / 64))
    return nn.Sequential(
        nn.Conv3d(3, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


class VideoResNetFeatures(VideoResNet):
    """torchvision's `VideoResNet` without pooling and classifier, its widths scaled by `width`.

    `VideoResNet.__init__` is bypassed because it fixes the channel counts; its `_make_layer` (which
    reads `self.inplanes`) is reused unchanged so the blocks and downsampling match torchvision.
    """

    def __init__(
        self,
        conv_makers: Sequence[type[nn.Module]],
        stem: Callable[[int], nn.Module],
        width: int = 64,
        layers: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        nn.Module.__init__(self)
        self.inplanes = width
        self.stem = stem(width)
        self.layer1 = self._make_layer(BasicBlock, conv_makers[0], width, layers[0], stride=1)
        self.layer2 = self._make_layer(BasicBlock, conv_makers[1], 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, conv_makers[2], 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, conv_makers[3], 8 * width, layers[3], stride=2)
        self.out_channels = 8 * width

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def r3d_18_features(width: int = 64) -> VideoResNetFeatures:
    """R3D-18 trunk: full 3D convolutions in every block."""
    return VideoResNetFeatures([Conv3DSimple] * 4, basic_stem, width)


def mc3_18_features(width: int = 64) -> VideoResNetFeatures:
    """MC3-18 trunk: 3D convolutions in the first stage, 2D (spatial-only) ones after it."""
    return VideoResNetFeatures([Conv3DSimple] + [Conv3DNoTemporal] * 3, basic_stem, width)


def r2plus1d_18_features(width: int = 64) -> VideoResNetFeatures:
    """R(2+1)D-18 trunk: each 3D convolution factorised into spatial then temporal ones."""
    return VideoResNetFeatures([Conv2Plus1D] * 4, r2plus1d_stem, width)
