"""PCL (Pretext-Contrastive Learning) as a step module, with or without action labels and a teacher.

One sample is a tuple of clips (`kdhar.data.tuples.TupleClipDataset`): the middle clip carries the
5-way pretext transform, the first and last are untouched. The loss is

    pretext CE  +  contrast_weight * (contrastive terms over the first and last clips)
                +  [with labels] the action term on the first and last clips,

where the action term is `LogitKD` (CE and the soft term to a frozen teacher, "reading A" of
../shared/methods/pcl.md section 4) for a distilled student and plain CE for its scratch twin, each
averaged over the two clips. Without labels (`kdhar pretrain`) only the self-supervised terms train.

The backbone is the student's own (`model.forward_features`, which applies its modality, e.g.
residual frames), shared by the clips of a tuple; the clips go through it as one batch, so
BatchNorm sees all clips of the batch together. The pretext head reads the concatenated pooled
features of the clips in tuple order; the projector sees the first and last clips' features.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdhar.config import PCLConfig
from kdhar.data.tuples import PRETEXT_LABELS
from kdhar.objectives.contrast import MemoryBankNCE, Projector, nt_xent
from kdhar.objectives.kd import LogitKD

PROJECTION_DIM = 128  # upstream's MoCo head output


class PCLStep(nn.Module):
    """`forward(clips, y, pretext, index)` returns {"loss", "output", "target", every "*_loss" term,
    "pretext_correct"}.

    Args:
        model: the network being trained (a `VideoClassifier`: trunk plus action head).
        num_rows: training videos, the memory bank's rows (the dataset index keys them).
        pcl: the PCL knobs (contrast mode and weight, bank size and temperature).
        tuple_len: clips per tuple.
        labels: train the action head on the labels (students) or not (label-free pretraining).
        kd: a `LogitKD` term (a distilled student), or None (CE only, the scratch twin).
    """

    def __init__(self, model: nn.Module, num_rows: int, pcl: PCLConfig, tuple_len: int = 3, labels: bool = True,
                 kd: LogitKD | None = None) -> None:
        super().__init__()
        if kd is not None and not labels:
            raise ValueError("KD inside PCL needs the action labels; label-free pretraining has no teacher")
        self.model = model
        dim = model.head.fc.in_features
        self.pretext_head = nn.Linear(tuple_len * dim, PRETEXT_LABELS)
        self.projector = Projector(dim, 512, PROJECTION_DIM)
        self.contrast, self.weight, self.temperature = pcl.contrast, float(pcl.contrast_weight), float(pcl.temperature)
        self.nce = (MemoryBankNCE(num_rows, PROJECTION_DIM, pcl.negatives, pcl.temperature, pcl.momentum,
                                  fp32_logits=pcl.fp32_logits) if pcl.contrast == "nce" else None)
        self.fp32_contrast = pcl.fp32_logits
        self.labels = labels
        self.kd = kd

    def features(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        """Feature maps (B, L, C, T', H', W') and pooled features (B, L, C) of every clip of a tuple batch."""
        b, n = clips.shape[:2]
        maps = self.model.forward_features(clips.flatten(0, 1))
        return maps.unflatten(0, (b, n)), maps.mean(dim=(2, 3, 4)).unflatten(0, (b, n))

    def pretext(self, pooled: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.pretext_head(pooled.flatten(1))
        return logits, F.cross_entropy(logits.float(), target)

    def forward(self, x: Tensor, y: Tensor, pretext: Tensor, index: Tensor,
                teacher_logits: Tensor | None = None) -> dict[str, Tensor]:
        """One training batch. Updates the memory banks (after scoring).

        Args:
            x: tuples (B, L, 3, T, H, W), the middle clip transformed by its pretext label.
            y: action labels (B,).
            pretext: pretext labels (B,).
            index: each sample's dataset index (its memory-bank row).
            teacher_logits: not supported (a teacher-logit cache is for single clips).
        """
        if teacher_logits is not None:
            raise ValueError("the teacher-logit cache is for single clips; PCL runs its teacher on each tuple")
        maps, pooled = self.features(x)
        pretext_logits, pretext_loss = self.pretext(pooled, pretext)
        out: dict[str, Tensor] = {"pretext_loss": pretext_loss}
        contrast = self.contrastive(pooled, index, out)
        loss = pretext_loss + self.weight * contrast
        out["pretext_correct"] = (pretext_logits.detach().argmax(dim=1) == pretext).sum()
        if not self.labels:
            return {**out, "loss": loss, "output": pretext_logits, "target": pretext}
        # The action head on the untransformed first and last clips, two predictions per sample.
        ends = maps[:, [0, -1]].flatten(0, 1)
        logits = self.model.head(ends)
        targets = y.repeat_interleave(2)
        if self.kd is not None:
            action = self.kd(logits, x[:, [0, -1]].flatten(0, 1), targets)
            out.update(task_loss=action["task_loss"], kd_loss=action["kd_loss"], kd_uniform_loss=action["kd_uniform_loss"])
            loss = loss + action["loss"]
        else:
            out["task_loss"] = F.cross_entropy(logits.float(), targets)
            loss = loss + out["task_loss"]
        output = logits.unflatten(0, (-1, 2)).mean(dim=1)  # a sample's score: the mean over its two clips
        return {**out, "loss": loss, "output": output, "target": y}

    def contrastive(self, pooled: Tensor, index: Tensor, out: dict[str, Tensor]) -> Tensor:
        """The contrastive term of the first and last clips' pooled features (its parts go into
        `out`). With `fp32_logits` the projector and the scores run in float32 outside autocast,
        as upstream trains in float32 throughout; the trunk stays under autocast."""
        full = torch.autocast(pooled.device.type, enabled=False) if self.fp32_contrast else contextlib.nullcontext()
        with full:
            z0, z2 = self.projector(pooled[:, 0].float()), self.projector(pooled[:, -1].float())
            if self.nce is None:
                out["ntxent_loss"] = nt_xent(z0, z2, self.temperature)
                return out["ntxent_loss"]
            out.update(self.nce(z0, z2, index))
            return out["nce0_loss"] + out["nce2_loss"]

    @torch.no_grad()
    def validate(self, x: Tensor, y: Tensor, pretext: Tensor, index: Tensor) -> dict[str, Tensor]:
        """The pretext loss on a batch of fixed tuples, with no contrastive term and no bank update
        (PCL's self-supervised validation, which uses no action label)."""
        _, pooled = self.features(x)
        logits, loss = self.pretext(pooled, pretext)
        return {"pretext_loss": loss, "pretext_correct": (logits.argmax(dim=1) == pretext).sum()}


__all__ = ["PCLStep", "PROJECTION_DIM"]
