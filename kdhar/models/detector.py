"""A temporal action detector on any registered trunk: two tapped feature maps and an anchor-free
1-D head.

The trunk is tapped at two depths, a middle stage and its last one (as GKD's detector taps I3D's
Mixed_4f and Mixed_5c), whose maps (N, C, T', H', W') are what feature distillation works on. The
head averages each map over space, projects both to `head_channels`, brings the deeper (coarser)
one to the middle one's length and adds them, then runs a small 1-D convolution tower. At each of
its T_out steps it predicts a logit per class and the distances from the step's centre back to the
action's start and on to its end, in its own steps (FCOS's anchor-free scheme in one dimension).
There are no anchors, no boundary pooling and no proposal refinement, so this is not AFSD.

One head step spans `stride = L / T_out` window steps for a window of L steps; `TAPS` says where
each trunk is tapped, and `tap_lengths` what T' the taps keep for a window length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdhar.models.registry import MODELS, build_model, residual_frames

# Registered trunk -> (middle tap, last tap) as submodule names; the last is the trunk's output.
# The middle one is one temporal halving shallower: /4 and /8 of the input's steps for C3D and the
# 3D and (2+1)D ResNets (I3D's Mixed_4f and Mixed_5c are /4 and /8 too), /2 and /4 for tiny3d; MC3
# keeps every step (its later stages convolve in space only).
TAPS: dict[str, tuple[str, str]] = {
    "c3d": ("layers.8", "layers.11"),  # conv4b, conv5b
    "r3d_18": ("layer3", "layer4"),
    "mc3_18": ("layer3", "layer4"),
    "r2plus1d_18": ("layer3", "layer4"),
    "r3d_10": ("stages.2", "stages.3"),
    "r2plus1d_10": ("stages.2", "stages.3"),
    "tiny3d": ("layers.4", "layers.6"),  # conv3, conv4
}
PRIOR = 0.01  # the class logits start at this probability, so focal loss is not swamped by background


class TemporalDetector(nn.Module):
    """Trunk taps plus the anchor-free head; `forward(x) = head(forward_taps(x))`.

    Inputs are (N, 3, L, H, W) windows. `head` returns `logits` (N, T_out, K), `distances`
    (N, T_out, 2) (to start, to end, in head steps, non-negative) and `stride` (window steps per head step).

    `attention`, None by default, is a module that reweights the two taps before the head
    (`forward(taps) -> taps`; GKD's attention module, `kdhar.objectives.detection_gkd.TapAttention`):
    it is part of the model at inference, so a logged detector carries it.
    """

    def __init__(self, backbone: nn.Module, taps: tuple[str, str], tap_channels: tuple[int, int], num_classes: int,
                 head_channels: int = 64, modality: str = "rgb") -> None:
        super().__init__()
        self.backbone, self.taps, self.modality, self.num_classes = backbone, taps, modality, num_classes
        self._middle = dict(backbone.named_modules())[taps[0]]
        self.reduce = nn.ModuleList(nn.Conv1d(c, head_channels, 1) for c in tap_channels)
        self.tower = nn.Sequential(
            nn.Conv1d(head_channels, head_channels, 3, padding=1), nn.GroupNorm(1, head_channels), nn.ReLU(),
            nn.Conv1d(head_channels, head_channels, 3, padding=1), nn.GroupNorm(1, head_channels), nn.ReLU(),
        )
        self.cls = nn.Conv1d(head_channels, num_classes, 3, padding=1)
        self.reg = nn.Conv1d(head_channels, 2, 3, padding=1)
        nn.init.constant_(self.cls.bias, -math.log((1 - PRIOR) / PRIOR))
        self.attention: nn.Module | None = None

    def forward_taps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The middle and last feature maps, each (N, C, T', H', W')."""
        if self.modality == "res":
            x = residual_frames(x)
        seen: list[Tensor] = []
        hook = self._middle.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            last = self.backbone(x)
        finally:
            hook.remove()
        return seen[-1], last

    def head(self, taps: tuple[Tensor, Tensor], window_steps: int) -> dict[str, Tensor | float]:
        """Per-step class logits and distances from the two taps of a `window_steps`-step window."""
        middle, last = (reduce(t.mean(dim=(3, 4))) for reduce, t in zip(self.reduce, taps))
        fused = middle + F.interpolate(last, size=middle.shape[-1], mode="linear", align_corners=False)
        hidden = self.tower(fused)
        return {
            "logits": self.cls(hidden).transpose(1, 2),
            "distances": F.softplus(self.reg(hidden)).transpose(1, 2),
            "stride": window_steps / middle.shape[-1],
        }

    def forward(self, x: Tensor) -> dict[str, Tensor | float]:
        taps = self.forward_taps(x)
        return self.head(taps if self.attention is None else self.attention(taps), x.shape[2])


class DetectorOutputs(nn.Module):
    """A detector as one tensor in, one tensor out, the form a logged model takes: (N, T_out, K + 2),
    the class logits, then the distances to start and to end. `split_outputs` reads it back."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> Tensor:
        out = self.detector(x)
        return torch.cat([out["logits"], out["distances"]], dim=-1)


def split_outputs(packed: Tensor, window_steps: int) -> dict[str, Tensor | float]:
    """`DetectorOutputs`' tensor as the detector's outputs for windows of `window_steps` steps."""
    return {"logits": packed[..., :-2], "distances": packed[..., -2:], "stride": window_steps / packed.shape[1]}


def tap_shapes(detector: TemporalDetector, length: int, crop: int) -> list[tuple[int, int, int, int]]:
    """(C, T', H', W') of the detector's two taps for a (3, length, crop, crop) window."""
    with torch.no_grad():
        param = next(detector.parameters())
        x = torch.zeros(1, 3, length, crop, crop, device=param.device, dtype=param.dtype)
        return [tuple(t.shape[1:]) for t in detector.forward_taps(x)]


def build_detector(arch: str, num_classes: int, width: int = 64, head_channels: int = 64,
                   modality: str = "rgb") -> TemporalDetector:
    """A detector on the registered trunk `arch`, initialised as the recognition models are.

    Raises:
        ValueError: an unknown arch, or one with no entry in TAPS.
    """
    if arch not in TAPS:
        raise ValueError(f"no detection taps for model {arch!r}; choose one of: {', '.join(sorted(TAPS))}")
    trunk = build_model(arch, num_classes, width=width, dropout=0.0, modality=modality).backbone
    (_, middle, _, _, _), (_, last, _, _, _) = _tap_shapes(arch, width, length=16, size=32)
    return TemporalDetector(trunk, TAPS[arch], (middle, last), num_classes, head_channels, modality)


def tap_lengths(arch: str, length: int, width: int = 8, size: int = 56) -> tuple[int, int]:
    """T' of the middle and last taps of `arch` for a window of `length` steps."""
    middle, last = _tap_shapes(arch, width, length, size)
    return middle[2], last[2]


def _tap_shapes(arch: str, width: int, length: int, size: int) -> list[tuple[int, ...]]:
    """Shapes of the two taps, from a trunk built and run on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        trunk = MODELS[arch](1, width, 0.0, "rgb").backbone
        modules = dict(trunk.named_modules())
        shapes: dict[str, tuple[int, ...]] = {}

        def record(name: str):
            def hook(_module: nn.Module, _inputs: tuple, out: Tensor) -> None:  # None: the output stays
                shapes[name] = tuple(out.shape)
            return hook

        for name in TAPS[arch]:
            modules[name].register_forward_hook(record(name))
        with torch.no_grad():
            trunk(torch.empty(1, 3, length, size, size))
    return [shapes[name] for name in TAPS[arch]]
