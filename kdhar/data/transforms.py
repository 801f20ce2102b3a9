"""Clip augmentation: one random draw per clip, applied identically to every frame.

The draw (`draw_params`) is separated from the pixel work (`apply_params`) and stored as plain
values in `ClipAugParams`, so a training view can be replayed exactly from its parameters. The
augmentations are the paper's (following SimCLR-style video pre-training): random crop, colour
jitter, grayscale, Gaussian blur and horizontal flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

# Networks here are trained from scratch on videos whose colour statistics are not ImageNet's, so a
# neutral 0.5/0.5 normalisation (pixels to [-1, 1]) is the default ("half"); PCL's code normalises
# with ImageNet's statistics ("imagenet"), the default of PCL runs (ClipConfig.normalize).
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
NORMALIZATIONS = {"half": (MEAN, STD), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}

JITTER_P = 0.8
BRIGHTNESS = 0.4  # factor drawn from [1 - 0.4, 1 + 0.4]; same for contrast and saturation
CONTRAST = 0.4
SATURATION = 0.4
HUE = 0.1  # shift drawn from [-0.1, 0.1] of the colour wheel
GRAY_P = 0.2
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
FLIP_P = 0.5


@dataclass(frozen=True)
class ClipAugParams:
    """Everything one augmented view depends on, as plain values.

    `crop` is (top, left, height, width) in the resized frame. Jitter factors are None when colour
    jitter was not drawn; `jitter_order` lists which of brightness (0), contrast (1), saturation (2)
    and hue (3) is applied first, as torchvision's ColorJitter randomises it.
    """

    resize: tuple[int, int]
    crop: tuple[int, int, int, int]
    flip: bool = False
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    jitter_order: tuple[int, ...] = (0, 1, 2, 3)
    gray: bool = False
    blur_sigma: float | None = None


def draw_params(
    rng: np.random.Generator | None,
    in_hw: tuple[int, int],
    resize: tuple[int, int] | None = (128, 171),
    crop: int = 112,
    augment: bool = True,
    hflip: bool = True,
) -> ClipAugParams:
    """Draws one clip's augmentation.

    Args:
        rng: source of randomness; may be None when `augment` is False.
        in_hw: (height, width) of the decoded frames.
        resize: (height, width) frames are scaled to before cropping; None keeps `in_hw`.
        crop: side of the square crop.
        augment: False gives the evaluation view: resize and centre crop only.
        hflip: allow horizontal flips (off for classes that are mirror images of each other).

    Raises:
        ValueError: the crop does not fit in the resized frame.
    """
    height, width = resize if resize is not None else in_hw
    if crop > height or crop > width:
        raise ValueError(
            f"crop {crop} does not fit in frames resized to {height}x{width}; lower crop or raise resize"
        )
    if not augment:
        top, left = (height - crop) // 2, (width - crop) // 2
        return ClipAugParams(resize=(height, width), crop=(top, left, crop, crop))
    if rng is None:
        raise ValueError("draw_params needs an rng when augment=True")
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    flip = bool(rng.random() < FLIP_P) and hflip  # drawn either way: same stream, same other draws
    jitter: dict[str, object] = {}
    if rng.random() < JITTER_P:
        jitter = {
            "brightness": float(rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)),
            "contrast": float(rng.uniform(1 - CONTRAST, 1 + CONTRAST)),
            "saturation": float(rng.uniform(1 - SATURATION, 1 + SATURATION)),
            "hue": float(rng.uniform(-HUE, HUE)),
            "jitter_order": tuple(int(i) for i in rng.permutation(4)),
        }
    gray = bool(rng.random() < GRAY_P)
    blur_sigma = float(rng.uniform(*BLUR_SIGMA)) if rng.random() < BLUR_P else None
    return ClipAugParams(
        resize=(height, width),
        crop=(top, left, crop, crop),
        flip=flip,
        gray=gray,
        blur_sigma=blur_sigma,
        **jitter,
    )


def apply_params(frames: np.ndarray | torch.Tensor, params: ClipAugParams, normalize: str = "half") -> torch.Tensor:
    """Applies one drawn augmentation to every frame of a clip.

    Args:
        frames: uint8 RGB frames (T, H, W, 3).
        params: from `draw_params`.
        normalize: the mean and std of `NORMALIZATIONS` to normalise with.

    Returns:
        float32 tensor (C, T, H, W), normalised.
    """
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)  # the (T, C, H, W) batch lets every op run on all frames at once
    if tuple(x.shape[-2:]) != tuple(params.resize):
        x = F.resize(x, list(params.resize), antialias=True)
    top, left, height, width = params.crop
    x = x[..., top : top + height, left : left + width]
    if params.flip:
        x = x.flip(-1)
    # Colour work in float: uint8 kernels would round to 8 bits after every step.
    x = x.float().div_(255.0)
    if params.brightness is not None:
        for op in params.jitter_order:
            x = _jitter(x, op, params)
    if params.gray:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur_sigma is not None:
        # A kernel of +-3 sigma holds >99 % of the Gaussian's weight.
        kernel = 2 * math.ceil(3 * params.blur_sigma) + 1
        x = F.gaussian_blur(x, [kernel, kernel], [params.blur_sigma, params.blur_sigma])
    x = F.normalize(x, *NORMALIZATIONS[normalize])
    return x.permute(1, 0, 2, 3).contiguous()


def _jitter(x: torch.Tensor, op: int, params: ClipAugParams) -> torch.Tensor:
    if op == 0:
        return F.adjust_brightness(x, params.brightness)
    if op == 1:
        return F.adjust_contrast(x, params.contrast)
    if op == 2:
        return F.adjust_saturation(x, params.saturation)
    return F.adjust_hue(x, params.hue)
