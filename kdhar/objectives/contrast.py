"""PCL's contrastive term: a projector and two memory banks scored across views (CMC-style, as the
public PCL code's `NCEAverage_ori`), with an in-batch NT-Xent alternative.

Views are the first and last clips of a tuple, z0 = h(g(c0)) and z2 = h(g(c2)). Bank M0 holds a
momentum average of every training video's z0, M2 of its z2. For sample i, K indices are drawn
uniformly with replacement from the bank rows (they may include i) and slot 0 is set to i; z0 is
scored against M2 at those rows and z2 against M0, divided by the temperature, and each is a
cross-entropy with the positive at position 0. The banks then move halfway to the new embeddings
and are renormalised. Memory rows carry no gradient; they are saved in a run's checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdhar.distributed import gather_rows


class Projector(nn.Module):
    """MoCo-v2 style head: Linear(d, hidden) -> ReLU -> Linear(hidden, out) -> L2 normalisation."""

    def __init__(self, in_features: int, hidden: int = 512, out_features: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


class MemoryBankNCE(nn.Module):
    """InfoNCE over K + 1 candidates against the other view's memory bank (one row per video).

    The banks are persistent buffers: a step's checkpoint holds them and a resumed run continues
    with the positives it had (upstream keeps them out of its checkpoints, so its resumes restart
    from random rows). Under torchrun every rank applies the whole global batch's update (see
    `update`), so each rank's banks equal the single-process ones.

    Args:
        num_rows: training videos (the bank's rows; the dataset index keys them).
        dim: embedding size.
        negatives: K rows drawn per sample; a bank with fewer rows still works (rows repeat, and the
            positive's own row may be drawn as a negative); the PCL objective tags such a run.
        temperature, momentum: upstream's 0.07 and 0.5.
        fp32_logits: score in float32 even under autocast, as upstream (which has no autocast);
            False lets autocast pick (bf16 on CUDA), whose 8-bit significand leaves logits near
            1/0.07 = 14 in steps of 1/16.
    """

    def __init__(self, num_rows: int, dim: int = 128, negatives: int = 1024, temperature: float = 0.07,
                 momentum: float = 0.5, fp32_logits: bool = True) -> None:
        super().__init__()
        if num_rows < 1 or negatives < 1 or temperature <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"memory bank: rows {num_rows}, K {negatives}, temperature {temperature}, "
                             f"momentum {momentum} (need rows, K >= 1, temperature > 0, momentum in [0, 1))")
        self.negatives, self.temperature, self.momentum = negatives, temperature, momentum
        self.fp32_logits = fp32_logits
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("bank0", torch.rand(num_rows, dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("bank2", torch.rand(num_rows, dim).mul_(2 * bound).sub_(bound))

    @property
    def rows(self) -> int:
        return self.bank0.shape[0]

    def forward(self, z0: Tensor, z2: Tensor, index: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Losses of one batch, then the bank update. `index`: each sample's bank row."""
        draw = torch.randint(self.rows, (z0.shape[0], self.negatives + 1), device=z0.device, generator=generator)
        draw[:, 0] = index
        logits0, logits2 = self.logits(z0, z2, draw)
        target = torch.zeros(z0.shape[0], dtype=torch.long, device=z0.device)
        out = {"nce0_loss": F.cross_entropy(logits0, target), "nce2_loss": F.cross_entropy(logits2, target)}
        self.update(index, z0, z2)
        return out

    def logits(self, z0: Tensor, z2: Tensor, draw: Tensor) -> tuple[Tensor, Tensor]:
        """(B, K + 1) logits of each view against the other view's bank rows `draw` (no gradient
        into the banks), in float32 unless `fp32_logits` is off."""
        mem0, mem2 = self.bank0[draw].detach(), self.bank2[draw].detach()  # (B, K+1, dim)
        if not self.fp32_logits:
            return self._scores(z0, mem2), self._scores(z2, mem0)
        with torch.autocast(z0.device.type, enabled=False):
            return self._scores(z0.float(), mem2.float()), self._scores(z2.float(), mem0.float())

    def _scores(self, z: Tensor, memory: Tensor) -> Tensor:
        return torch.bmm(memory, z.unsqueeze(2)).squeeze(2) / self.temperature

    @torch.no_grad()
    def update(self, index: Tensor, z0: Tensor, z2: Tensor) -> None:
        """Moves each sample's rows 1 - `momentum` of the way to its new embeddings and renormalises;
        under torchrun with the rows of every rank's share of the global batch, so no rank's update
        is lost (a global batch holds each video once, so the order does not matter)."""
        index, z = gather_rows(index, torch.cat([z0, z2], dim=1).detach().to(self.bank0.dtype))
        for bank, new in ((self.bank0, z[:, :z0.shape[1]]), (self.bank2, z[:, z0.shape[1]:])):
            bank[index] = F.normalize(self.momentum * bank[index] + (1 - self.momentum) * new, dim=1)


def nt_xent(z0: Tensor, z2: Tensor, temperature: float = 0.07) -> Tensor:
    """In-batch NT-Xent (SimCLR): each embedding's positive is its other view, the 2B - 2 other
    embeddings of the batch are its negatives. Not upstream; an option for small data."""
    z = torch.cat([z0, z2])
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z0.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


__all__ = ["Projector", "MemoryBankNCE", "nt_xent"]
