"""GKD's building blocks (generative-model-based feature KD, AAAI-24; ../shared/methods/gkd.md):
the channel x time attention over a last-stage feature, the conditional VAE that regenerates the
feature from it, the attention-weighted feature, their losses, and the adapter that aligns a student
feature with a teacher's of another shape.

Shapes follow the feature F = (B, C, T', H', W') of any registry trunk (`forward_features`):

- `AttentionHead`: F -> A, (B, C, T') in (0, 1). "faithful" is the paper's head scaled to C (a
  (1, H', W') convolution to C/2 channels, time resized to L = max(C, T'), a 1-D convolution to C channels,
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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("faithful", "light")
RESCALES = ("sample", "batch")
# How a GroupNorm picks its groups. "values": as many of the code's 32 groups as keep at least
# MIN_GROUP_VALUES distinct values in each group. "channels": gcd(C, 32) whatever a group then holds,
# the earlier rule: at the CPU widths (C/2 <= 32) that is one channel per group, and with T' = 1 a
# group normalises a single value, so the attention is the GroupNorm's bias for every clip.
NORMS = ("values", "channels")
MIN_GROUP_VALUES = 16
KL_WEIGHT = 0.1  # the code's weight of the KL term in the CVAE loss
# An attention whose std over an epoch's clips (mean over channels and time) is below this is
# degenerate: the same for every clip (the "channels" norm at T' = 1 gives 0 up to rounding).
DEGENERATE_ATTENTION_STD = 1e-3


def _groups(channels: int, values: int, norm: str = "values", wanted: int = 32) -> int:
    """GroupNorm's group count for `channels` channels of `values` distinct values each.

    At the paper's I3D shape (C/2 = 512, T' = 8) both rules give the code's 32 groups.
    """
    if norm not in NORMS:
        raise ValueError(f"GKD norm {norm!r}: choose one of {', '.join(NORMS)}")
    if norm == "channels":
        return math.gcd(channels, wanted)
    fits = [g for g in range(min(wanted, channels), 0, -1)
            if channels % g == 0 and channels // g * values >= MIN_GROUP_VALUES]
    return fits[0] if fits else 1


def _norm(channels: int, values: int, norm: str) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels, values, norm), channels)


class AttentionHead(nn.Module):
    """Channel x time attention A (B, C, T') from a feature map (B, C, T', H', W').

    Args:
        channels, time, space: C, T' and (H', W') of the feature (the Linear over time fixes T').
        variant: "faithful" or "light" (see the module docstring).
        norm: how its GroupNorms choose groups (`NORMS`).
    """

    def __init__(self, channels: int, time: int, space: tuple[int, int], variant: str = "faithful",
                 norm: str = "values") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"GKD variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        half = max(1, channels // 2)
        self.variant, self.channels, self.time = variant, channels, time
        # The resized axis: L = C, as the code (at its shapes C > T'); a window's T' can exceed a
        # narrow trunk's C, where L = C would drop time steps before the Linear spread them back.
        self.length = max(channels, time)
        kernel = (1, *space) if variant == "faithful" else (1, 1, 1)
        # Space is collapsed (or pooled) first, so each channel carries T' distinct values; the
        # resize of time to L = C below repeats them without adding any.
        self.collapse = nn.Sequential(nn.Conv3d(channels, half, kernel), _norm(half, time, norm), nn.ReLU())
        k = 3 if variant == "faithful" else 1
        self.mix = nn.Sequential(nn.Conv1d(half, channels, k, padding=k // 2), _norm(channels, time, norm), nn.ReLU())
        self.to_time = nn.Linear(self.length, time)  # from the resized axis L back to T'

    def forward(self, feature: Tensor) -> Tensor:
        x = feature if self.variant == "faithful" else feature.mean(dim=(3, 4), keepdim=True)
        x = self.collapse(x).flatten(2)  # (B, C/2, T')
        x = F.interpolate(x, size=self.length, mode="nearest")  # time resized to L
        return torch.sigmoid(self.to_time(self.mix(x)))  # (B, C, T')


class CVAE(nn.Module):
    """The conditional VAE of a feature given its attention (per time step, latent size C).

    `forward(feature, attention)` returns (mu, logvar, z, regenerated); `inference(attention)`
    returns the feature generated from z = A_t + eps. `noise` replaces the random eps (tests).
    """

    def __init__(self, channels: int, time: int, space: tuple[int, int], variant: str = "faithful",
                 norm: str = "values") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"GKD variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        c = channels
        self.variant, self.space = variant, tuple(space)
        kernel = (1, *space) if variant == "faithful" else (1, 1, 1)
        self.collapse = nn.Sequential(nn.Conv3d(c, c, kernel), _norm(c, time, norm), nn.ReLU())
        self.encoder = nn.Sequential(nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 2 * c))
        self.decoder = nn.Sequential(nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
        expand = (nn.ConvTranspose3d(c, c, kernel) if variant == "faithful" else nn.Conv3d(c, c, 1))
        # "faithful" spreads each step over space with a learned kernel; "light" repeats it over space.
        spread = time * space[0] * space[1] if variant == "faithful" else time
        self.expand = nn.Sequential(expand, _norm(c, spread, norm), nn.ReLU())

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
        parts = [f"1x1x1 conv {cs}->{ct}"] if cs != ct else []
        if ss != st:
            parts.append(f"resize {'x'.join(map(str, ss))}->{'x'.join(map(str, st))}")
        return ", ".join(parts)


def feature_shape(model: nn.Module, clip_len: int, crop: int) -> tuple[int, int, int, int]:
    """(C, T', H', W') of a model's last feature map for one zero (3, clip_len, crop, crop) clip."""
    with torch.no_grad():
        param = next(model.parameters())
        x = torch.zeros(1, 3, clip_len, crop, crop, device=param.device, dtype=param.dtype)
        return tuple(model.forward_features(x).shape[1:])


class AttentionAdapter(nn.Module):
    """Aligns a student attention (B, C_s, T_s) with a teacher's (B, C_t, T_t): a learned 1 x 1
    convolution over channels (the 1 x 1 x 1 adapter's counterpart), then linear resizing of time."""

    def __init__(self, student: tuple[int, int], teacher: tuple[int, int]) -> None:
        super().__init__()
        self.teacher_time = teacher[1]
        self.proj = nn.Conv1d(student[0], teacher[0], 1) if student[0] != teacher[0] else nn.Identity()

    def forward(self, attention: Tensor) -> Tensor:
        x = self.proj(attention)
        if x.shape[-1] != self.teacher_time:
            x = F.interpolate(x, size=self.teacher_time, mode="linear", align_corners=False)
        return x


class GKDNet(nn.Module):
    """A classifier whose head reads the attention-weighted last feature (§2.3): forward(x) =
    head(attend(F, A(F))). The attention head is part of the model at inference, so a logged GKD
    model carries it; the trunk and head keep the names of the plain classifier (`backbone.*`,
    `head.*`), so its weights load into one (e.g. to fine-tune the trunk).

    Args:
        model: the plain classifier (`kdhar.models.build_model`) whose trunk and head are reused.
        attention: its `AttentionHead`.
        rescale: "sample" or "batch" (see `attend`).
    """

    def __init__(self, model: nn.Module, attention: AttentionHead, rescale: str = "sample") -> None:
        super().__init__()
        if rescale not in RESCALES:
            raise ValueError(f"GKD rescale {rescale!r}: choose one of {', '.join(RESCALES)}")
        self.modality, self.num_classes, self.rescale = model.modality, model.num_classes, rescale
        self.backbone, self.head, self.attention = model.backbone, model.head, attention

    def forward_features(self, x: Tensor) -> Tensor:
        """The trunk's last feature map, (N, C, T', H', W'), as the plain classifier's."""
        from kdhar.models import residual_frames

        return self.backbone(residual_frames(x) if self.modality == "res" else x)

    def attended(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """(A, F_att) for a feature map. The batch-global rescale is a training-time option: at test
        time a clip's prediction never depends on the other clips of its batch."""
        attention = self.attention(feature)
        return attention, attend(feature, attention, self.rescale if self.training else "sample")

    def time_logits(self, attended: Tensor) -> Tensor:
        """Per-time-step logits (B, T', K) of the attended feature (space pooled)."""
        return self.head.fc(self.head.dropout(attended.mean(dim=(3, 4)).transpose(1, 2)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attended(self.forward_features(x))[1])


def gkd_task_loss(net: GKDNet, attended: Tensor, logits: Tensor, y: Tensor, ce: str) -> Tensor:
    """CE on the time-averaged logits ("mean", default) or the code's CE on the softmax summed over
    time ("sum-softmax", §2.4: a second softmax over probabilities)."""
    if ce == "mean":
        return F.cross_entropy(logits.float(), y)
    return F.cross_entropy(net.time_logits(attended).float().softmax(dim=-1).sum(dim=1), y)


def build_gkd_net(model: nn.Module, clip_len: int, crop: int, variant: str, rescale: str,
                  norm: str = "values") -> tuple[GKDNet, CVAE]:
    """A plain classifier turned into a GKD network and its CVAE, sized from its last feature."""
    c, t, h, w = feature_shape(model, clip_len, crop)
    return (GKDNet(model, AttentionHead(c, t, (h, w), variant, norm), rescale),
            CVAE(c, t, (h, w), variant, norm))


def ramp_share(epoch: int, batches: int, steps_per_epoch: int, ramp_epochs: float) -> float:
    """The regeneration weight's share after `batches` steps of 0-based `epoch`: the epochs done,
    counted in steps, over the ramp's length in epochs, at most 1.

    At the end of epoch e (1-based) it is e / R, upstream's weight for its epoch e (R = 20 of 200
    epochs); a 6-epoch run with R = 0.6 starts at 1 / (0.6 x steps_per_epoch), not at full weight.
    """
    return min(1.0, (epoch + batches / steps_per_epoch) / ramp_epochs)


class AttentionSpread:
    """The std of the attention A (B, C, T') over the clips it has seen, per (channel, time) step and
    then averaged: sums and squared sums in float64 on A's device, read once (`std`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.clips, self.sum, self.sumsq = 0, None, None

    def add(self, attention: Tensor) -> None:
        a = attention.detach().double()
        s, q = a.sum(dim=0), (a * a).sum(dim=0)
        self.sum, self.sumsq = (s, q) if self.sum is None else (self.sum + s, self.sumsq + q)
        self.clips += a.shape[0]

    def std(self) -> float | None:
        """The sample std over clips, mean over channels and time; None before two clips."""
        if self.clips < 2:
            return None
        mean = self.sum / self.clips
        var = (self.sumsq - self.clips * mean * mean) / (self.clips - 1)
        return float(var.clamp_min(0).sqrt().mean())


class GKDStep(nn.Module):
    """The GKD step in two passes per epoch (`passes`; `set_pass` picks one): "cvae" trains the CVAE
    (its VAE loss, plus `gd_weight` x generative distillation with a teacher), "net" the network
    (CE on the attended feature, the ramped regeneration loss, plus `beta` x attention distillation
    with a teacher, and optionally logit KD through `kd`). `cfg.ablation` turns one term off
    (`GKDConfig.weights`). Without a teacher this is GKD's phase 1
    (a teacher with its attention module) or the "scratch + attention module" baseline.

    Teacher, teacher CVAE and the logit-KD term's teacher are frozen and unregistered (not in
    `parameters()` or `state_dict()`). When the teacher's feature differs in shape, the student's is
    aligned by `FeatureAdapter` / `AttentionAdapter` (trained in the net pass: the attention adapter
    by attention distillation, the feature adapter by regressing the detached student feature on
    the teacher's, `align_loss`, so the alignment itself puts no pull on the student).

    Args:
        net, cvae: the student's `GKDNet` and `CVAE` (`build_gkd_net`).
        cfg: the run's `kdhar.config.GKDConfig`.
        epochs: the run's epochs (the ramp's length is `cfg.ramp` of them).
        clip: (clip_len, crop), to size the adapters.
        teacher, teacher_cvae: the frozen GKD teacher, or None.
        kd: a `LogitKD` term on the student's logits (gkd+logit), or None.
        steps_per_epoch: the net pass's batches per epoch, until the first epoch has counted them.
    """

    passes = ("cvae", "net")

    def __init__(self, net: GKDNet, cvae: CVAE, cfg: Any, epochs: int, clip: tuple[int, int],
                 teacher: GKDNet | None = None, teacher_cvae: CVAE | None = None, kd: nn.Module | None = None,
                 steps_per_epoch: int = 1) -> None:
        super().__init__()
        self.model, self.cvae, self.kd, self.cfg = net, cvae, kd, cfg
        self.weights = cfg.weights()  # beta, gd_weight, rec_weight, with an ablation's term at 0
        # The ramp runs in steps over `ramp` of the run, so a short run ramps too (rounding it to whole
        # epochs made it one epoch for any run <= 14 epochs, full weight from the first step).
        self.ramp_epochs = cfg.ramp * epochs
        self.steps_per_epoch, self.epoch_index, self.batches = max(1, steps_per_epoch), 0, 0
        self.stage = "net"
        self.spread = AttentionSpread()  # the attention's health over the epoch's training clips
        self.adapter = self.attention_adapter = None
        if teacher is not None:
            for frozen in (teacher, teacher_cvae):
                frozen.eval().requires_grad_(False)
            self.__dict__["teacher"], self.__dict__["teacher_cvae"] = teacher, teacher_cvae
            student, target = feature_shape(net, *clip), feature_shape(teacher, *clip)
            self.adapter = FeatureAdapter(student, target)
            self.attention_adapter = AttentionAdapter(student[:2], target[:2])
        else:
            self.__dict__["teacher"] = self.__dict__["teacher_cvae"] = None

    def train(self, mode: bool = True) -> GKDStep:
        super().train(mode)
        for frozen in (self.teacher, self.teacher_cvae):
            if frozen is not None:
                frozen.eval()
        return self

    def _apply(self, fn, recurse: bool = True) -> GKDStep:
        for frozen in (self.teacher, self.teacher_cvae):
            if frozen is not None:
                frozen._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def pass_parameters(self, name: str) -> list[nn.Parameter]:
        """What the pass's optimiser steps: the CVAE's, or everything else (network and adapters)."""
        cvae = {id(p) for p in self.cvae.parameters()}
        return [p for p in self.parameters() if (id(p) in cvae) == (name == "cvae")]

    def pass_optimizer(self, name: str) -> torch.optim.Optimizer:
        """The CVAE's own optimiser: Adam at `cvae_lr`, betas (0.8, 0.999), as the recognition code."""
        return torch.optim.Adam(self.pass_parameters(name), lr=self.cfg.cvae_lr, betas=(0.8, 0.999))

    def set_pass(self, name: str) -> None:
        """Freezes everything but the pass's parameters (the frozen part still runs in train mode,
        so BatchNorm statistics move in the CVAE pass, as upstream)."""
        if name not in self.passes:
            raise ValueError(f"GKD pass {name!r}: one of {', '.join(self.passes)}")
        self.stage = name
        cvae = {id(p) for p in self.cvae.parameters()}
        for p in self.parameters():
            p.requires_grad_((id(p) in cvae) == (name == "cvae"))

    def set_epoch(self, epoch: int) -> None:
        if epoch > self.epoch_index and self.batches:
            self.steps_per_epoch = self.batches  # the loader's real length, counted over the last epoch
        self.epoch_index, self.batches = epoch, 0
        self.spread.reset()

    def attention_std(self) -> float | None:
        """The std of the attention over the clips of this epoch's net-pass training batches, mean
        over channels and time (`AttentionSpread`); None before any."""
        return self.spread.std()

    @property
    def ramp(self) -> float:
        return ramp_share(self.epoch_index, self.batches, self.steps_per_epoch, self.ramp_epochs)

    def _teacher_view(self, feature: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
        return self.adapter(feature), self.attention_adapter(attention)

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss", "output", named terms} of the current pass (`set_pass`)."""
        if self.stage == "cvae":
            return self._cvae_pass(x)
        return self._net_pass(x, y, teacher_logits)

    def _cvae_pass(self, x: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            feature = self.model.forward_features(x)
            attention, attended = self.model.attended(feature)
            logits = self.model.head(attended)
        mu, logvar, _, regenerated = self.cvae(feature, attention)
        terms = cvae_loss(feature, regenerated, mu, logvar, attention)
        out = {"loss": terms["loss"], "recon_loss": terms["recon_loss"], "kl_loss": terms["kl_loss"], "output": logits}
        if self.teacher is not None:
            # Generative distillation: the teacher's CVAE regenerates the *student's* feature from
            # the student's attention (both aligned to the teacher's shape); the student's CVAE
            # output is pulled towards it.
            with torch.no_grad():
                target = self.teacher_cvae(*self._teacher_view(feature, attention))[3]
            gd = F.mse_loss(self.adapter(regenerated).float(), target.float())
            out["gd_loss"] = gd
            out["loss"] = out["loss"] + self.weights["gd_weight"] * gd
        return out

    def _net_pass(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None) -> dict[str, Tensor]:
        training = self.training and torch.is_grad_enabled()
        if training:
            self.batches += 1  # a training step: the ramp moves on
        feature = self.model.forward_features(x)
        attention, attended = self.model.attended(feature)
        if training:
            self.spread.add(attention)
        logits = self.model.head(attended)
        task = gkd_task_loss(self.model, attended, logits, y, self.cfg.ce)
        # The regeneration target is not detached: its gradient reaches the trunk too (§8).
        rec = F.mse_loss(self.cvae.inference(attention).float(), feature.float())
        out = {"task_loss": task, "rec_loss": rec, "output": logits}
        loss = task
        if self.teacher is not None:
            with torch.no_grad():
                t_feature = self.teacher.forward_features(x)
                t_attention, t_attended = self.teacher.attended(t_feature)
                t_logits = self.teacher.head(t_attended).float() if self.kd is not None and teacher_logits is None else None
            ad = F.mse_loss(self.attention_adapter(attention).float(), t_attention.float())
            out["ad_loss"] = ad
            loss = loss + self.weights["beta"] * ad
            if self.adapter.needed:
                align = F.mse_loss(self.adapter(feature.detach()).float(), t_feature.float())
                out["align_loss"] = align
                loss = loss + align
            if self.kd is not None:
                kd = self.kd(logits, x, y, teacher_logits if teacher_logits is not None else t_logits)
                out["kd_loss"], out["kd_uniform_loss"] = kd["kd_loss"], kd["kd_uniform_loss"]
                w_task, w_kd = self.kd.weights  # the KD term's weights, on the --gkd-ce task loss
                loss = loss - task + w_task * task + w_kd * kd["kd_loss"]
        out["loss"] = loss + self.ramp * self.weights["rec_weight"] * rec
        return out


def gkd_state(net: GKDNet, cvae: CVAE, meta: dict[str, Any]) -> dict[str, Any]:
    """What a GKD model logs beside its exported graph, so it can teach: the network's and the CVAE's
    weights (the graph drops the CVAE, which inference never runs) and how to rebuild them."""
    return {**meta, "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "cvae": {k: v.detach().cpu() for k, v in cvae.state_dict().items()}}


def load_gkd_state(state: dict[str, Any]) -> tuple[GKDNet, CVAE]:
    """Rebuilds a GKD network and its CVAE from `gkd_state`."""
    from kdhar.models import build_model

    model = build_model(state["arch"], state["num_classes"], width=state["width"], modality=state["modality"],
                        keep_time=state.get("keep_time", 0))
    # Models logged before the norm rule was recorded used the "channels" rule.
    net, cvae = build_gkd_net(model, state["clip_len"], state["crop"], state["variant"], state["rescale"],
                              state.get("norm", "channels"))
    net.load_state_dict(state["net"])
    cvae.load_state_dict(state["cvae"])
    return net.eval(), cvae.eval()


__all__ = ["VARIANTS", "RESCALES", "NORMS", "DEGENERATE_ATTENTION_STD", "AttentionHead", "AttentionSpread", "CVAE", "cvae_loss", "attend", "FeatureAdapter", "feature_shape",
           "AttentionAdapter", "GKDNet", "GKDStep", "ramp_share", "build_gkd_net", "gkd_state", "load_gkd_state", "gkd_task_loss"]
