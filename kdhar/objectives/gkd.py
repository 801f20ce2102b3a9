"""GKD's building blocks (generative-model-based feature KD, AAAI-24; ../shared/methods/gkd.md):
the channel x time attention over a last-stage feature, the conditional VAE that regenerates the
feature from it, the attention-weighted feature, their losses, and the adapter that aligns a student
feature with a teacher's of another shape.

Shapes follow the feature F = (B, C, T', H', W') of any registry trunk (`forward_features`):

- `AttentionHead`: F -> A, (B, C, T') in (0, 1). "faithful" is the paper's head scaled to C (a
  (1, H', W') convolution to C/2 channels, time resized to L = C, a 1-D convolution to C channels,
  GroupNorm, Linear(L -> T') over time, sigmoid); "light" pools space instead of the (1, H', W')
  convolution and uses 1 x 1 convolutions, for wide trunks and CPUs (a deviation, named in params).
- `CVAE`: q(z | F, A) per time step (mu, log sigma^2 of size C each), p(F | z, A), prior N(A_t, I);
  `inference(A)` generates from the attention alone, z = A_t + eps.
- `cvae_loss`: mean squared reconstruction + 0.1 x the mean KL to N(A, I) (means over every element,
  as the code).
- `attend`: F * A broadcast over space, rescaled so the activation mass is unchanged: per sample
  (default) or over the whole batch (the code's, which makes a sample's features depend on its batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("faithful", "light")
RESCALES = ("sample", "batch")
KL_WEIGHT = 0.1  # the code's weight of the KL term in the CVAE loss


def _groups(channels: int, wanted: int = 32) -> int:
    """GroupNorm's 32 groups where they divide the channels, else the largest divisor below."""
    return math.gcd(channels, wanted)


class AttentionHead(nn.Module):
    """Channel x time attention A (B, C, T') from a feature map (B, C, T', H', W').

    Args:
        channels, time, space: C, T' and (H', W') of the feature (the Linear over time fixes T').
        variant: "faithful" or "light" (see the module docstring).
    """

    def __init__(self, channels: int, time: int, space: tuple[int, int], variant: str = "faithful") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"GKD variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        half = max(1, channels // 2)
        self.variant, self.channels, self.time = variant, channels, time
        kernel = (1, *space) if variant == "faithful" else (1, 1, 1)
        self.collapse = nn.Sequential(nn.Conv3d(channels, half, kernel), nn.GroupNorm(_groups(half), half), nn.ReLU())
        k = 3 if variant == "faithful" else 1
        self.mix = nn.Sequential(nn.Conv1d(half, channels, k, padding=k // 2), nn.GroupNorm(_groups(channels), channels),
                                 nn.ReLU())
        self.to_time = nn.Linear(channels, time)  # from the resized axis L = C back to T'

    def forward(self, feature: Tensor) -> Tensor:
        x = feature if self.variant == "faithful" else feature.mean(dim=(3, 4), keepdim=True)
        x = self.collapse(x).flatten(2)  # (B, C/2, T')
        x = F.interpolate(x, size=self.channels, mode="nearest")  # time resized to L = C
        return torch.sigmoid(self.to_time(self.mix(x)))  # (B, C, T')


class CVAE(nn.Module):
    """The conditional VAE of a feature given its attention (per time step, latent size C).

    `forward(feature, attention)` returns (mu, logvar, z, regenerated); `inference(attention)`
    returns the feature generated from z = A_t + eps. `noise` replaces the random eps (tests).
    """

    def __init__(self, channels: int, time: int, space: tuple[int, int], variant: str = "faithful") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"GKD variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        c = channels
        self.variant, self.space = variant, tuple(space)
        kernel = (1, *space) if variant == "faithful" else (1, 1, 1)
        self.collapse = nn.Sequential(nn.Conv3d(c, c, kernel), nn.GroupNorm(_groups(c), c), nn.ReLU())
        self.encoder = nn.Sequential(nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 2 * c))
        self.decoder = nn.Sequential(nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
        expand = (nn.ConvTranspose3d(c, c, kernel) if variant == "faithful" else nn.Conv3d(c, c, 1))
        self.expand = nn.Sequential(expand, nn.GroupNorm(_groups(c), c), nn.ReLU())

    def encode(self, feature: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
        """mu and log sigma^2, each (B, T', C)."""
        x = feature if self.variant == "faithful" else feature.mean(dim=(3, 4), keepdim=True)
        x = self.collapse(x).flatten(2)  # (B, C, T')
        stats = self.encoder(torch.cat([x, attention], dim=1).transpose(1, 2))
        return stats.chunk(2, dim=-1)

    def decode(self, z: Tensor, attention: Tensor) -> Tensor:
        """The feature (B, C, T', H', W') from latents z (B, T', C) and the attention (B, C, T')."""
        x = self.decoder(torch.cat([z, attention.transpose(1, 2)], dim=-1))  # (B, T', C)
        x = x.transpose(1, 2)[..., None, None]  # (B, C, T', 1, 1)
        if self.variant == "light":
            x = x.expand(-1, -1, -1, *self.space)
        return self.expand(x)

    def forward(self, feature: Tensor, attention: Tensor, noise: Tensor | None = None):
        mu, logvar = self.encode(feature, attention)
        eps = torch.randn_like(mu) if noise is None else noise
        z = mu + eps * torch.exp(0.5 * logvar)
        return mu, logvar, z, self.decode(z, attention)

    def inference(self, attention: Tensor, noise: Tensor | None = None) -> Tensor:
        """Generates a feature from the attention alone: z = A_t + eps (the prior's sample)."""
        mean = attention.transpose(1, 2)
        eps = torch.randn_like(mean) if noise is None else noise
        return self.decode(mean + eps, attention)


def cvae_loss(feature: Tensor, regenerated: Tensor, mu: Tensor, logvar: Tensor, attention: Tensor) -> dict[str, Tensor]:
    """{"loss", "recon_loss", "kl_loss"}: mean((F - F_hat)^2) + 0.1 x mean of the KL of N(mu, sigma^2)
    to the conditional prior N(A_t, I), -1/2 (1 + log sigma^2 - (mu - A_t)^2 - sigma^2), per element."""
    recon = F.mse_loss(regenerated.float(), feature.float())
    prior = attention.transpose(1, 2).float()
    kl = (-0.5 * (1 + logvar.float() - (mu.float() - prior) ** 2 - logvar.float().exp())).mean()
    return {"loss": recon + KL_WEIGHT * kl, "recon_loss": recon, "kl_loss": kl}


def attend(feature: Tensor, attention: Tensor, rescale: str = "sample") -> Tensor:
    """F * A (A broadcast over H', W'), rescaled by sum(F) / sum(F * A) per sample or over the batch."""
    if rescale not in RESCALES:
        raise ValueError(f"GKD rescale {rescale!r}: choose one of {', '.join(RESCALES)}")
    weighted = feature * attention[..., None, None]
    dims = tuple(range(1, feature.dim())) if rescale == "sample" else tuple(range(feature.dim()))
    scale = feature.sum(dim=dims, keepdim=True) / weighted.sum(dim=dims, keepdim=True).clamp_min(1e-12)
    return weighted * scale


class FeatureAdapter(nn.Module):
    """Aligns a student feature (B, C_s, T_s, H_s, W_s) with a teacher's (C_t, T_t, H_t, W_t): a learned
    1 x 1 x 1 convolution over channels, then trilinear resizing of time and space. Identity when the
    shapes already match."""

    def __init__(self, student: tuple[int, int, int, int], teacher: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.student, self.teacher = tuple(student), tuple(teacher)
        self.proj = nn.Conv3d(student[0], teacher[0], 1) if student[0] != teacher[0] else nn.Identity()

    @property
    def needed(self) -> bool:
        return self.student != self.teacher

    def forward(self, feature: Tensor) -> Tensor:
        x = self.proj(feature)
        if tuple(x.shape[2:]) != self.teacher[1:]:
            x = F.interpolate(x, size=self.teacher[1:], mode="trilinear", align_corners=False)
        return x

    def describe(self) -> str:
        """What the adapter does, for the run's params."""
        if not self.needed:
            return "none"
        (cs, *ss), (ct, *st) = self.student, self.teacher
        return f"1x1x1 conv {cs}->{ct}, resize {'x'.join(map(str, ss))}->{'x'.join(map(str, st))}"


def feature_shape(model: nn.Module, clip_len: int, crop: int) -> tuple[int, int, int, int]:
    """(C, T', H', W') of a model's last feature map for one zero (3, clip_len, crop, crop) clip."""
    with torch.no_grad():
        param = next(model.parameters())
        x = torch.zeros(1, 3, clip_len, crop, crop, device=param.device, dtype=param.dtype)
        return tuple(model.forward_features(x).shape[1:])


__all__ = ["VARIANTS", "RESCALES", "AttentionHead", "CVAE", "cvae_loss", "attend", "FeatureAdapter", "feature_shape"]
