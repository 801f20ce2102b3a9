"""The 10-layer R3D and R(2+1)D of the VCOP/PCL code, the backbones of the PCL and KD papers.

One block per stage (64/128/256/512 channels at width 64, scaled by `width`), no max-pooling: the
stem strides space by 2, and the first block of each later stage strides time and space by 2 in its
first convolution and in a 1x1x1 projection of the shortcut. R(2+1)D factorises every convolution,
the stem's and the projection's too, into a spatial and a temporal one with M mid channels chosen
so the pair has as many weights as the 3D kernel (M = floor(t*h*w*in*out / (h*w*in + t*out))). No
convolution has a bias. At width 64 they have 14.36 M and 14.37 M parameters, against 33.2 M and
31.3 M for torchvision's 18-layer networks, which reverses the papers' size order against C3D.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

Triple = tuple[int, int, int]
ConvMaker = Callable[[int, int, Triple, Triple, Triple], nn.Module]


def conv3d(cin: int, cout: int, kernel: Triple, stride: Triple, padding: Triple) -> nn.Module:
    """A full 3D convolution (R3D)."""
    return nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=False)


def conv2plus1d(cin: int, cout: int, kernel: Triple, stride: Triple, padding: Triple) -> nn.Module:
    """A spatial (1, h, w) convolution, BatchNorm and ReLU, then a temporal (t, 1, 1) one (R(2+1)D)."""
    t, h, w = kernel
    mid = math.floor(t * h * w * cin * cout / (h * w * cin + t * cout))
    return nn.Sequential(
        nn.Conv3d(cin, mid, (1, h, w), stride=(1, *stride[1:]), padding=(0, *padding[1:]), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, cout, (t, 1, 1), stride=(stride[0], 1, 1), padding=(padding[0], 0, 0), bias=False),
    )


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut (projected when the block strides), then ReLU."""

    def __init__(self, cin: int, cout: int, make_conv: ConvMaker, stride: int) -> None:
        super().__init__()
        s = (stride,) * 3
        self.conv1 = nn.Sequential(make_conv(cin, cout, (3, 3, 3), s, (1, 1, 1)), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(make_conv(cout, cout, (3, 3, 3), (1, 1, 1), (1, 1, 1)), nn.BatchNorm3d(cout))
        self.shortcut = (nn.Sequential(make_conv(cin, cout, (1, 1, 1), s, (0, 0, 0)), nn.BatchNorm3d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.shortcut(x) + self.conv2(self.conv1(x)))


class VCOPResNet(nn.Module):
    """The stem and four one-block stages; `forward` returns the last feature map (N, 8w, T', H', W')."""

    def __init__(self, make_conv: ConvMaker, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(make_conv(3, width, (3, 7, 7), (1, 2, 2), (1, 3, 3)), nn.BatchNorm3d(width),
                                  nn.ReLU(inplace=True))
        widths = (width, 2 * width, 4 * width, 8 * width)
        self.stages = nn.Sequential(*(Block(cin, cout, make_conv, 1 if i == 0 else 2)
                                      for i, (cin, cout) in enumerate(zip((width, *widths[:-1]), widths))))
        self.out_channels = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


def r3d_10_features(width: int = 64) -> VCOPResNet:
    """R3D-10 trunk (VCOP/PCL's R3D, layer sizes (1, 1, 1, 1))."""
    return VCOPResNet(conv3d, width)


def r2plus1d_10_features(width: int = 64) -> VCOPResNet:
    """R(2+1)D-10 trunk (VCOP/PCL's R(2+1)D, layer sizes (1, 1, 1, 1))."""
    return VCOPResNet(conv2plus1d, width)
