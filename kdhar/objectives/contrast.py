"""PCL's contrastive term: a projector and two memory banks scored across views (CMC-style, as the
public PCL code's `NCEAverage_ori`), with an in-batch NT-Xent alternative.

Views are the first and last clips of a tuple, z0 = h(g(c0)) and z2 = h(g(c2)). Bank M0 holds a
momentum average of every training video's z0, M2 of its z2. For sample i, K indices are drawn
uniformly with replacement from the bank rows (they may include i) and slot 0 is set to i; z0 is
scored against M2 at those rows and z2 against M0, divided by the temperature, and each is a
cross-entropy with the positive at position 0. The banks then move halfway to the new embeddings
and are renormalised. Memory rows carry no gradient and are not saved in checkpoints.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


class Projector(nn.Module):
    """MoCo-v2 style head: Linear(d, hidden) -> ReLU -> Linear(hidden, out) -> L2 normalisation."""

    def __init__(self, in_features: int, hidden: int = 512, out_features: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


class MemoryBankNCE(nn.Module):
    """InfoNCE over K + 1 candidates against the other view's memory bank (one row per video).

    Args:
        num_rows: training videos (the bank's rows; the dataset index keys them).
        dim: embedding size.
        negatives: K rows drawn per sample; a bank with fewer rows still works (rows repeat, and the
            positive's own row may be drawn as a negative), which is logged once.
        temperature, momentum: upstream's 0.07 and 0.5.
    """

    def __init__(self, num_rows: int, dim: int = 128, negatives: int = 1024, temperature: float = 0.07,
                 momentum: float = 0.5) -> None:
        super().__init__()
        if num_rows < 1 or negatives < 1 or temperature <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"memory bank: rows {num_rows}, K {negatives}, temperature {temperature}, "
                             f"momentum {momentum} (need rows, K >= 1, temperature > 0, momentum in [0, 1))")
        self.negatives, self.temperature, self.momentum = negatives, temperature, momentum
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("bank0", torch.rand(num_rows, dim).mul_(2 * bound).sub_(bound), persistent=False)
        self.register_buffer("bank2", torch.rand(num_rows, dim).mul_(2 * bound).sub_(bound), persistent=False)
        if num_rows < negatives:
            log.warning("memory bank has %d rows, fewer than its %d negatives: rows repeat within a draw", num_rows,
                        negatives)

    def forward(self, z0: Tensor, z2: Tensor, index: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Losses of one batch, then the bank update. `index`: each sample's bank row."""
        rows = self.bank0.shape[0]
        draw = torch.randint(rows, (z0.shape[0], self.negatives + 1), device=z0.device, generator=generator)
        draw[:, 0] = index
        with torch.no_grad():
            mem0, mem2 = self.bank0[draw], self.bank2[draw]  # (B, K+1, dim), no gradient
        logits0 = torch.bmm(mem2, z0.unsqueeze(2)).squeeze(2) / self.temperature
        logits2 = torch.bmm(mem0, z2.unsqueeze(2)).squeeze(2) / self.temperature
        target = torch.zeros(z0.shape[0], dtype=torch.long, device=z0.device)
        out = {"nce0_loss": F.cross_entropy(logits0, target), "nce2_loss": F.cross_entropy(logits2, target)}
        with torch.no_grad():
            for bank, z in ((self.bank0, z0), (self.bank2, z2)):
                bank[index] = F.normalize(self.momentum * bank[index] + (1 - self.momentum) * z.detach(), dim=1)
        return out


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
