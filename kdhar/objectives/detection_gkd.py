"""GKD's temporal-detection terms (../shared/methods/gkd.md, §3b "Detection"): the detector's two taps
(GKD's Mixed_4f and Mixed_5c) each get their own channel x time attention A and CVAE.

- Foreground F·A/ΣA feeds the head and learns the window's segments; background F·(1−A)/Σ(1−A)
  feeds the same head and learns the gaps between the segments as background (GKD's
  "complementary segments"), weighted by `bg_weight` (35 in the detection code). Both sums run over
  each window's own attention and are divided by its element count, so the head sees features at
  the trunk's scale: the code's ΣA runs over the whole batch tensor, which shrinks the feature by the
  batch's element count and makes a window's features depend on its batch.
- The CVAE pass trains the CVAEs: per level the VAE loss (`gkd.cvae_loss`), plus, with a teacher,
  `gd_weight` x generative distillation, the MSE between the student CVAE's regeneration and the
  teacher CVAE's regeneration of the *student's* feature and attention (aligned to the teacher's
  shape), summed over the levels.
- The network pass: the foreground detection loss + `bg_weight` x the background loss + the ramped
  `rec_weight` x the regeneration loss summed over the levels, and with a teacher `beta` x attention
  distillation MSE(A_s, A_t) summed over the levels (β = 10 in the detection code).

Without a teacher this is GKD's teacher phase with attention (or the "scratch + attention" baseline).
The attention module is part of the detector at inference (`TemporalDetector.attention`); the CVAEs
are training-only and are logged beside the model (`detector_state`), so the run can teach.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdhar.models.detector import TemporalDetector, build_detector, tap_shapes
from kdhar.objectives.detection import background_targets, batch_targets, detection_losses, supervised_terms
from kdhar.objectives.gkd import (CVAE, KL_WEIGHT, AttentionAdapter, AttentionHead, AttentionSpread, FeatureAdapter,
                                  cvae_loss, ramp_share)

EPS = 1e-6


def foreground(feature: Tensor, attention: Tensor) -> Tensor:
    """F·A/ΣA per window, times A's element count: (B, C, T', H', W') weighted by A (B, C, T')."""
    a = attention[..., None, None]
    return feature * a / a.mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(EPS)


def background(feature: Tensor, attention: Tensor) -> Tensor:
    """F·(1−A)/Σ(1−A) per window, times A's element count: what the attention leaves out."""
    a = 1 - attention[..., None, None]
    return feature * a / a.mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(EPS)


class TapAttention(nn.Module):
    """One `gkd.AttentionHead` per tap; as a detector's `attention` it hands the head the foreground."""

    def __init__(self, shapes: list[tuple[int, int, int, int]], variant: str = "faithful", norm: str = "values") -> None:
        super().__init__()
        self.heads = nn.ModuleList(AttentionHead(c, t, (h, w), variant, norm) for c, t, h, w in shapes)

    def weights(self, taps: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """A (B, C, T') of each tap."""
        return tuple(head(f) for head, f in zip(self.heads, taps))

    def forward(self, taps: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(foreground(f, a) for f, a in zip(taps, self.weights(taps)))


def attach_attention(detector: TemporalDetector, length: int, crop: int, variant: str = "faithful",
                     norm: str = "values") -> nn.ModuleList:
    """Gives `detector` GKD's attention module for (length, crop) windows; returns its CVAEs."""
    shapes = tap_shapes(detector, length, crop)
    detector.attention = TapAttention(shapes, variant, norm)
    return nn.ModuleList(CVAE(c, t, (h, w), variant, norm) for c, t, h, w in shapes)


def detector_state(model: TemporalDetector, cvaes: nn.ModuleList | None, meta: dict[str, Any]) -> dict[str, Any]:
    """What a detection run logs beside its exported graph, so it can teach: how to rebuild the
    detector (`meta`: arch, num_classes, width, head_channels, modality, length, crop, and variant and
    norm with attention), its weights and, with attention, its CVAEs' weights."""
    state = {**meta, "attention": model.attention is not None,
             "net": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if cvaes is not None:
        state["cvaes"] = {k: v.detach().cpu() for k, v in cvaes.state_dict().items()}
    return state


def load_detector_state(state: dict[str, Any]) -> tuple[TemporalDetector, nn.ModuleList | None]:
    """Rebuilds a detector (and its CVAEs, if it has the attention module) from `detector_state`."""
    model = build_detector(state["arch"], state["num_classes"], width=state["width"],
                           head_channels=state["head_channels"], modality=state["modality"])
    cvaes = None
    if state["attention"]:
        cvaes = attach_attention(model, state["length"], state["crop"], state["variant"], state["norm"])
        cvaes.load_state_dict(state["cvaes"])
        cvaes.eval()
    model.load_state_dict(state["net"])
    return model.eval(), cvaes


class FrozenTeacher(nn.Module):
    """A step whose teacher parts stay frozen, in eval mode, out of `parameters()` and `state_dict()`,
    and move with the step (`.to(device)`)."""

    frozen_names: tuple[str, ...] = ()

    def freeze(self, **parts: nn.Module | None) -> None:
        for name, part in parts.items():
            if part is not None:
                part.eval().requires_grad_(False)
            self.__dict__[name] = part
        self.frozen_names = tuple(parts)

    def _frozen(self) -> list[nn.Module]:
        return [p for p in (self.__dict__.get(n) for n in self.frozen_names) if p is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        for part in self._frozen():
            part.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        for part in self._frozen():
            part._apply(fn, recurse)
        return super()._apply(fn, recurse)


class DetectionGKDStep(FrozenTeacher):
    """GKD for a detector in two passes per epoch (`passes`, `set_pass`), as `gkd.GKDStep` for a
    classifier: "cvae" trains the per-level CVAEs, "net" the detector with its attention module and
    the adapters (see the module docstring for each pass's loss).

    Args:
        model: the student detector with its attention module (`attach_attention`).
        cvaes: its CVAEs, one per tap.
        cfg: the run's `GKDConfig` (ramp, rec_weight, beta, gd_weight, cvae_lr).
        reg_weight, bg_weight: the GIoU loss's weight and the background branch's.
        epochs: the run's epochs (the ramp's length is `cfg.ramp` of them).
        window: (length, crop) of the windows, to size the adapters.
        teacher, teacher_cvaes: the frozen GKD detection teacher and its CVAEs, or None.
        steps_per_epoch: the net pass's batches per epoch, until the first epoch has counted them.
    """

    passes = ("cvae", "net")

    def __init__(self, model: TemporalDetector, cvaes: nn.ModuleList, cfg: Any, reg_weight: float, bg_weight: float,
                 epochs: int, window: tuple[int, int], teacher: TemporalDetector | None = None,
                 teacher_cvaes: nn.ModuleList | None = None, steps_per_epoch: int = 1) -> None:
        super().__init__()
        self.model, self.cvaes, self.cfg = model, cvaes, cfg
        self.reg_weight, self.bg_weight = reg_weight, bg_weight
        self.ramp_epochs = cfg.ramp * epochs
        self.steps_per_epoch, self.epoch_index, self.batches = max(1, steps_per_epoch), 0, 0
        self.stage = "net"
        self.spreads = [AttentionSpread() for _ in cvaes]
        self.freeze(teacher=teacher, teacher_cvaes=teacher_cvaes)
        self.adapters = self.attention_adapters = None
        if teacher is not None:
            student, target = tap_shapes(model, *window), tap_shapes(teacher, *window)
            self.adapters = nn.ModuleList(FeatureAdapter(s, t) for s, t in zip(student, target))
            self.attention_adapters = nn.ModuleList(AttentionAdapter(s[:2], t[:2]) for s, t in zip(student, target))

    # ------------------------------------------------------------ passes, as gkd.GKDStep

    def pass_parameters(self, name: str) -> list[nn.Parameter]:
        cvae = {id(p) for p in self.cvaes.parameters()}
        return [p for p in self.parameters() if (id(p) in cvae) == (name == "cvae")]

    def pass_optimizer(self, name: str) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.pass_parameters(name), lr=self.cfg.cvae_lr, betas=(0.8, 0.999))

    def set_pass(self, name: str) -> None:
        if name not in self.passes:
            raise ValueError(f"GKD pass {name!r}: one of {', '.join(self.passes)}")
        self.stage = name
        cvae = {id(p) for p in self.cvaes.parameters()}
        for p in self.parameters():
            p.requires_grad_((id(p) in cvae) == (name == "cvae"))

    def set_epoch(self, epoch: int) -> None:
        if epoch > self.epoch_index and self.batches:
            self.steps_per_epoch = self.batches
        self.epoch_index, self.batches = epoch, 0
        for spread in self.spreads:
            spread.reset()

    def attention_std(self) -> float | None:
        """The attention's std over the epoch's net-pass windows, averaged over the two taps."""
        stds = [s.std() for s in self.spreads]
        return None if any(v is None for v in stds) else sum(stds) / len(stds)

    @property
    def ramp(self) -> float:
        return ramp_share(self.epoch_index, self.batches, self.steps_per_epoch, self.ramp_epochs)

    def forward(self, clip: Tensor, y: Tensor | None = None, *, segments: list[Tensor], labels: list[Tensor],
                ambiguous: list[Tensor], valid_steps: Tensor) -> dict[str, Tensor]:
        if self.stage == "cvae":
            return self._cvae_pass(clip)
        return self._net_pass(clip, segments, labels, ambiguous, valid_steps)

    # ------------------------------------------------------------ the CVAE pass

    def _cvae_pass(self, clip: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            taps = self.model.forward_taps(clip)
            attentions = self.model.attention.weights(taps)
        recon = kl = gd = torch.zeros((), device=clip.device)
        for level, (cvae, feature, attention) in enumerate(zip(self.cvaes, taps, attentions)):
            mu, logvar, _, regenerated = cvae(feature, attention)
            terms = cvae_loss(feature, regenerated, mu, logvar, attention)
            recon, kl = recon + terms["recon_loss"], kl + terms["kl_loss"]
            if self.teacher is not None:
                gd = gd + self._generative_distillation(level, feature, attention, regenerated)
        loss = recon + KL_WEIGHT * kl
        # Nothing is classified in this pass: no step for the epoch's accuracy to count.
        result = {"recon_loss": recon, "kl_loss": kl, "output": torch.zeros(0, 1, device=clip.device),
                  "target": torch.zeros(0, dtype=torch.long, device=clip.device)}
        if self.teacher is not None:
            result["gd_loss"] = gd
            loss = loss + self.cfg.gd_weight * gd
        result["loss"] = loss
        return result

    def _generative_distillation(self, level: int, feature: Tensor, attention: Tensor, regenerated: Tensor) -> Tensor:
        """MSE(student CVAE's F̂, the teacher CVAE's F̂ of the student's feature and attention)."""
        adapter, att_adapter = self.adapters[level], self.attention_adapters[level]
        with torch.no_grad():
            target = self.teacher_cvaes[level](adapter(feature), att_adapter(attention))[3]
        return F.mse_loss(adapter(regenerated).float(), target.float())

    # ------------------------------------------------------------ the network pass

    def _net_pass(self, clip: Tensor, segments: list[Tensor], labels: list[Tensor], ambiguous: list[Tensor],
                  valid_steps: Tensor) -> dict[str, Tensor]:
        training = self.training and torch.is_grad_enabled()
        if training:
            self.batches += 1
        taps = self.model.forward_taps(clip)
        attentions = self.model.attention.weights(taps)
        if training:
            for spread, attention in zip(self.spreads, attentions):
                spread.add(attention)
        length = clip.shape[2]
        fg = self.model.head(tuple(foreground(f, a) for f, a in zip(taps, attentions)), length)
        out = supervised_terms(fg, batch_targets(fg, segments, labels, ambiguous, valid_steps), self.reg_weight)
        bg = self.model.head(tuple(background(f, a) for f, a in zip(taps, attentions)), length)
        bg_terms = detection_losses(bg["logits"], bg["distances"], background_targets(bg, segments, ambiguous, valid_steps))
        out["bg_loss"] = bg_terms["cls_loss"] + self.reg_weight * bg_terms["reg_loss"]
        # The regeneration target is not detached: its gradient reaches the trunk too (§8).
        out["rec_loss"] = sum(F.mse_loss(cvae.inference(a).float(), f.float())
                              for cvae, f, a in zip(self.cvaes, taps, attentions))
        loss = out["loss"] + self.bg_weight * out["bg_loss"] + self.ramp * self.cfg.rec_weight * out["rec_loss"]
        if self.teacher is not None:
            loss = loss + self._distillation(clip, taps, attentions, out)
        out["loss"] = loss
        return out

    def _distillation(self, clip: Tensor, taps: tuple[Tensor, ...], attentions: tuple[Tensor, ...],
                      out: dict[str, Tensor]) -> Tensor:
        """beta x attention distillation summed over the levels, plus the feature adapters' own
        regression of the detached student taps on the teacher's (`align_loss`, when shapes differ)."""
        with torch.no_grad():
            t_taps = self.teacher.forward_taps(clip)
            t_attentions = self.teacher.attention.weights(t_taps)
        out["ad_loss"] = sum(F.mse_loss(adapt(a).float(), t.float())
                             for adapt, a, t in zip(self.attention_adapters, attentions, t_attentions))
        loss = self.cfg.beta * out["ad_loss"]
        if any(a.needed for a in self.adapters):
            out["align_loss"] = sum(F.mse_loss(adapt(f.detach()).float(), t.float())
                                    for adapt, f, t in zip(self.adapters, taps, t_taps))
            loss = loss + out["align_loss"]
        return loss
