"""Model registry: one name -> builder dict, the shared classifier wrapper and a size/FLOP probe."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kdhar.config import MODALITIES
from kdhar.models.c3d import c3d_features
from kdhar.models.resnet3d import mc3_18_features, r2plus1d_18_features, r3d_18_features
from kdhar.models.small import tiny3d_features
from kdhar.models.temporal import keep_time as keep_time_in
from kdhar.models.vcop import r2plus1d_10_features, r3d_10_features


class ClassifierHead(nn.Module):
    """Global average pooling over (T, H, W), dropout, then a linear layer to logits."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        # A mean rather than AdaptiveAvgPool3d: its backward is deterministic on CUDA.
        pooled = features.mean(dim=(2, 3, 4))
        return self.fc(self.dropout(pooled))




def residual_frames(x: Tensor) -> Tensor:
    """PCL's residual ("res") input: r[:, :, t] = x[:, :, t-1] - x[:, :, t] over time (dim 2), with
    a circular roll so that r[:, :, 0] = x[:, :, T-1] - x[:, :, 0]; no rescaling. Computed on the
    normalised clip, so only the 1/std channel scaling of the normalisation remains."""
    return torch.roll(x, shifts=1, dims=2) - x


class VideoClassifier(nn.Module):
    """A feature trunk plus `ClassifierHead`; `forward(x) = head(forward_features(x))`.

    Inputs are (N, 3, T, H, W) RGB clips; every trunk handles any T, H, W >= 1. With modality
    "res" the model turns its input into residual frames itself (`residual_frames`), so a logged
    (exported) model carries its modality and evaluation cannot feed it the wrong one.
    """

    def __init__(
        self, backbone: nn.Module, feature_channels: int, num_classes: int, dropout: float, modality: str = "rgb"
    ) -> None:
        super().__init__()
        self.modality = modality
        self.backbone = backbone
        self.head = ClassifierHead(feature_channels, num_classes, dropout)
        self.num_classes = num_classes
        # torchvision's video ResNet initialisation, applied to every architecture alike.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Returns the last feature map, (N, C, T', H', W')."""
        if self.modality == "res":
            x = residual_frames(x)
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


Builder = Callable[[int, int, float, str], VideoClassifier]


def _builder(trunk: Callable[[int], nn.Module]) -> Builder:
    def build(num_classes: int, width: int = 64, dropout: float = 0.5, modality: str = "rgb") -> VideoClassifier:
        backbone = trunk(width)
        return VideoClassifier(backbone, backbone.out_channels, num_classes, dropout, modality)

    return build


MODELS: dict[str, Builder] = {
    "c3d": _builder(c3d_features),
    "r3d_18": _builder(r3d_18_features),
    "mc3_18": _builder(mc3_18_features),
    "r2plus1d_18": _builder(r2plus1d_18_features),
    "r3d_10": _builder(r3d_10_features),  # the PCL / KD papers' R3D
    "r2plus1d_10": _builder(r2plus1d_10_features),  # the PCL / KD papers' R(2+1)D
    "tiny3d": _builder(tiny3d_features),
}


def build_model(
    name: str, num_classes: int, width: int = 64, dropout: float = 0.5, modality: str = "rgb", keep_time: int = 0,
) -> VideoClassifier:
    """Builds a registered architecture.

    Args:
        name: a key of `MODELS`.
        num_classes: size of the logit vector.
        width: base channel count (64 is the published size; every layer scales with it).
        dropout: dropout probability before the final linear layer.
        modality: "rgb" (frames as they are) or "res" (residual frames, PCL's input).
        keep_time: the trunk's last temporal downsamplings left out, so its last feature keeps a time
            axis (`kdhar.models.temporal.keep_time`); 0 is the architecture as published.

    Raises:
        ValueError: unknown name or modality, or a non-positive width / class count, or dropout
            outside [0, 1), or keep_time < 0.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    if width < 1:
        raise ValueError(f"model width must be >= 1, got {width}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    model = MODELS[name](num_classes, width, dropout, modality)
    keep_time_in(model.backbone, keep_time)
    return model


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def describe(name: str, num_classes: int, width: int, clip_len: int, crop: int, keep_time: int = 0) -> dict[str, int]:
    """Parameter count and forward FLOPs for one (3, clip_len, crop, crop) clip.

    The model is built on the meta device, so this costs no memory or compute even at full size.
    """
    with torch.device("meta"):
        model = build_model(name, num_classes, width=width, keep_time=keep_time).eval()
        x = torch.empty(1, 3, clip_len, crop, crop)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return {"params": count_params(model), "flops": int(counter.get_total_flops())}
