"""The supervised temporal-detection objective: targets for an anchor-free 1-D head, sigmoid focal
loss on its class logits and 1-D GIoU loss on its segments.

Targets (FCOS in one dimension). Head step t of a window stands for window steps
[t·s, (t + 1)·s) with centre c = (t + ½)·s, s the head's stride. The step is positive for a segment
[start, end] (window steps) when start < c < end; inside two segments it takes the shorter, as FCOS
does. A positive step's class target is its segment's class and its distance targets are
(c − start, end − c) / s, in head steps. Every other step is background (all class targets 0),
except steps whose centre lies in an Ambiguous span or past the video's end, which the class loss
leaves out.

Losses. The class loss is the sigmoid focal loss (Lin et al., 2017; α 0.25, γ 2) summed over the
counted steps and classes and divided by the number of positive steps (at least one). The box loss
is 1 − GIoU between the predicted segment [c − d̂_start·s, c + d̂_end·s] and the target, averaged over
positive steps. Both segments contain c, so they overlap and GIoU's enclosing-hull term is zero here:
the loss equals 1 − IoU, while `giou_1d` itself handles any pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


@dataclass(frozen=True)
class HeadTargets:
    """Per head step: class targets (T, K) in {0, 1}, distance targets (T, 2) (valid where
    `positive`), `positive` (T,) and `counted` (T,) (the steps the class loss uses)."""

    classes: Tensor
    distances: Tensor
    positive: Tensor
    counted: Tensor


def head_targets(segments: Tensor, labels: Tensor, ambiguous: Tensor, valid_steps: int, num_steps: int,
                 stride: float, num_classes: int) -> HeadTargets:
    """Targets of one window for a head of `num_steps` steps of `stride` window steps each.

    Args:
        segments: (M, 2) start and end in window steps.
        labels: (M,) classes.
        ambiguous: (A, 2) Ambiguous spans in window steps.
        valid_steps: window steps inside the video.
        num_steps: the head's T_out.
        stride: window steps per head step.
        num_classes: K.
    """
    centre = (torch.arange(num_steps, dtype=torch.float32) + 0.5) * stride
    segs = segments.float().reshape(-1, 2)
    inside = (segs[None, :, 0] < centre[:, None]) & (centre[:, None] < segs[None, :, 1])  # (T, M)
    length = (segs[:, 1] - segs[:, 0])[None, :].expand_as(inside)
    shortest = torch.where(inside, length, torch.full_like(length, float("inf"))).argmin(dim=1) if len(segs) else None
    positive = inside.any(dim=1)
    classes = torch.zeros(num_steps, num_classes)
    distances = torch.zeros(num_steps, 2)
    if positive.any():
        chosen = segs[shortest[positive]]
        c = centre[positive]
        distances[positive] = torch.stack([c - chosen[:, 0], chosen[:, 1] - c], dim=1) / stride
        classes[positive, labels[shortest[positive]]] = 1.0
    amb = ambiguous.float().reshape(-1, 2)
    in_ambiguous = ((amb[None, :, 0] <= centre[:, None]) & (centre[:, None] <= amb[None, :, 1])).any(dim=1)
    counted = positive | ~(in_ambiguous | (centre >= valid_steps))
    return HeadTargets(classes, distances, positive, counted)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> Tensor:
    """Element-wise focal loss: −α_t (1 − p_t)^γ log p_t, with p_t the probability of the target."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def giou_1d(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalised IoU of 1-D segments (…, 2) as (start, end): IoU − (hull − union) / hull."""
    inter = (torch.minimum(pred[..., 1], target[..., 1]) - torch.maximum(pred[..., 0], target[..., 0])).clamp(min=0)
    union = (pred[..., 1] - pred[..., 0]) + (target[..., 1] - target[..., 0]) - inter
    hull = torch.maximum(pred[..., 1], target[..., 1]) - torch.minimum(pred[..., 0], target[..., 0])
    return inter / union.clamp(min=eps) - (hull - union) / hull.clamp(min=eps)


def detection_losses(logits: Tensor, distances: Tensor, targets: list[HeadTargets]) -> dict[str, Tensor]:
    """Focal and GIoU losses of a batch: `logits` (N, T, K), `distances` (N, T, 2), one target per window."""
    cls_t = torch.stack([t.classes for t in targets]).to(logits)
    dist_t = torch.stack([t.distances for t in targets]).to(distances)
    positive = torch.stack([t.positive for t in targets]).to(logits.device)
    counted = torch.stack([t.counted for t in targets]).to(logits.device)
    num_pos = positive.sum().clamp(min=1)
    cls_loss = sigmoid_focal_loss(logits[counted], cls_t[counted]).sum() / num_pos
    if positive.any():
        pred = torch.stack([-distances[..., 0], distances[..., 1]], dim=-1)[positive]  # around c = 0
        goal = torch.stack([-dist_t[..., 0], dist_t[..., 1]], dim=-1)[positive]
        reg_loss = (1 - giou_1d(pred, goal)).mean()
    else:
        reg_loss = distances.sum() * 0.0  # keeps the graph (and DDP) whole on a batch without actions
    return {"cls_loss": cls_loss, "reg_loss": reg_loss, "num_positive": positive.sum()}


def batch_targets(out: dict[str, Tensor | float], segments: list[Tensor], labels: list[Tensor],
                  ambiguous: list[Tensor], valid_steps: Tensor) -> list[HeadTargets]:
    """The targets of every window of a batch for the head outputs `out` (its steps and stride)."""
    num_steps, num_classes = out["logits"].shape[1:]
    return [head_targets(s, lab, a, int(v), num_steps, out["stride"], num_classes)
            for s, lab, a, v in zip(segments, labels, ambiguous, valid_steps)]


def gaps(segments: Tensor, valid_steps: int) -> Tensor:
    """The stretches of a window's valid steps [0, valid_steps] that no segment covers, (G, 2): the
    "complementary segments" GKD's background branch learns as background."""
    segs = segments.float().reshape(-1, 2).clamp(0, valid_steps)
    out, cursor = [], 0.0
    for start, end in sorted(segs.tolist()):
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < valid_steps:
        out.append((cursor, float(valid_steps)))
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 2)


def background_targets(out: dict[str, Tensor | float], segments: list[Tensor], ambiguous: list[Tensor],
                       valid_steps: Tensor) -> list[HeadTargets]:
    """Targets of the background branch: the gaps between a window's segments as segments to
    regress, and every class target 0 (background) at every counted step."""
    num_steps, num_classes = out["logits"].shape[1:]
    found = []
    for s, a, v in zip(segments, ambiguous, valid_steps):
        between = gaps(s, int(v))
        t = head_targets(between, torch.zeros(len(between), dtype=torch.long), a, int(v), num_steps, out["stride"],
                         num_classes)
        found.append(HeadTargets(torch.zeros_like(t.classes), t.distances, t.positive, t.counted))
    return found


def scored_steps(logits: Tensor, targets: list[HeadTargets]) -> tuple[Tensor, Tensor]:
    """(logits (P, K), labels (P,)) of the positive steps: what a training epoch's accuracy counts
    (the class the head ranks first where an action is)."""
    positive = torch.stack([t.positive for t in targets]).to(logits.device)
    labels = torch.stack([t.classes for t in targets]).to(logits.device).argmax(dim=-1)
    return logits.detach()[positive], labels[positive]


def supervised_terms(out: dict[str, Tensor | float], targets: list[HeadTargets], reg_weight: float) -> dict[str, Tensor]:
    """{"loss" = cls + reg_weight x reg, "cls_loss", "reg_loss", "num_positive", "output", "target"}."""
    losses = detection_losses(out["logits"], out["distances"], targets)
    losses["loss"] = losses["cls_loss"] + reg_weight * losses["reg_loss"]
    losses["output"], losses["target"] = scored_steps(out["logits"], targets)
    return losses


class DetectionStep(nn.Module):
    """One supervised detection step: the detector's outputs on a window batch and its losses.

    `forward(clip, y=None, *, segments, labels, ambiguous, valid_steps)` takes a `collate_windows`
    batch's fields (the engine passes no labels `y`: a window's are its segments') and returns
    {"loss", "cls_loss", "reg_loss", "num_positive", "output", "target"} with loss = cls +
    reg_weight x reg; "output" and "target" are the positive steps' logits and classes, which the
    engine's training accuracy counts.
    """

    def __init__(self, model: nn.Module, reg_weight: float = 1.0) -> None:
        super().__init__()
        self.model, self.reg_weight = model, reg_weight

    def forward(self, clip: Tensor, y: Tensor | None = None, *, segments: list[Tensor], labels: list[Tensor],
                ambiguous: list[Tensor], valid_steps: Tensor) -> dict[str, Tensor]:
        out = self.model(clip)
        return supervised_terms(out, batch_targets(out, segments, labels, ambiguous, valid_steps), self.reg_weight)
