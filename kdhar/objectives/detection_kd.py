"""Score distillation for a temporal detector: the logit-KD baseline of GKD's detection comparison.

The detector scores each class at each head step with its own sigmoid (no softmax over classes, no
background logit), so the soft term is the KL between the teacher's and the student's Bernoulli
distributions of every (step, class) at temperature τ:

    KL_τ = Σ_k p_t log(p_t / p_s) + (1 − p_t) log((1 − p_t) / (1 − p_s)),  p = σ(logit / τ),

averaged over the window steps inside the video (padded steps carry nothing to learn), scaled by τ²
as Hinton's KD, and added with weight λ to the supervised loss (focal + GIoU):
loss = L_det + λ·τ²·KL_τ. When the teacher's head has another number of steps (another trunk),
its logits are resized linearly over time to the student's steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdhar.objectives.detection import batch_targets, supervised_terms
from kdhar.objectives.detection_gkd import FrozenTeacher


def bernoulli_kl(teacher_logits: Tensor, student_logits: Tensor, tau: float) -> Tensor:
    """KL(σ(t/τ) ‖ σ(s/τ)) per element, from logits (stable: log σ and log(1 − σ) via logsigmoid)."""
    t, s = teacher_logits.float() / tau, student_logits.float() / tau
    p = torch.sigmoid(t)
    return p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))


def score_kd_loss(teacher_logits: Tensor, student_logits: Tensor, valid: Tensor, tau: float) -> Tensor:
    """τ² x the Bernoulli KL summed over classes and averaged over the valid steps.

    Args:
        teacher_logits, student_logits: (N, T, K); the teacher's already on the student's T.
        valid: (N, T) bool, the steps inside the video.
    """
    per_step = bernoulli_kl(teacher_logits, student_logits, tau).sum(dim=-1)
    return tau * tau * per_step[valid].sum() / valid.sum().clamp(min=1)


def to_steps(logits: Tensor, steps: int) -> Tensor:
    """(N, T, K) logits resized linearly over time to `steps` steps (unchanged when T = steps)."""
    if logits.shape[1] == steps:
        return logits
    return F.interpolate(logits.transpose(1, 2), size=steps, mode="linear", align_corners=False).transpose(1, 2)


class DetectionKDStep(FrozenTeacher):
    """The supervised detection loss plus λ·τ²·KL of the per-step class scores to a frozen teacher's.

    `forward` takes a window batch as `DetectionStep` does and returns its terms plus "kd_loss".
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, tau: float = 1.0, lam: float = 1.0,
                 reg_weight: float = 1.0) -> None:
        super().__init__()
        if tau <= 0 or lam < 0:
            raise ValueError(f"score distillation needs tau > 0 and lam >= 0, got tau={tau}, lam={lam}")
        self.model, self.tau, self.lam, self.reg_weight = model, tau, lam, reg_weight
        self.freeze(teacher=teacher)

    def forward(self, clip: Tensor, y: Tensor | None = None, *, segments: list[Tensor], labels: list[Tensor],
                ambiguous: list[Tensor], valid_steps: Tensor) -> dict[str, Tensor]:
        out = self.model(clip)
        targets = batch_targets(out, segments, labels, ambiguous, valid_steps)
        terms = supervised_terms(out, targets, self.reg_weight)
        with torch.no_grad():
            teacher = self.teacher(clip)["logits"]
        steps = out["logits"].shape[1]
        centre = (torch.arange(steps, device=clip.device) + 0.5) * out["stride"]
        valid = centre[None, :] < valid_steps.to(clip.device)[:, None]
        terms["kd_loss"] = score_kd_loss(to_steps(teacher, steps), out["logits"], valid, self.tau)
        terms["loss"] = terms["loss"] + self.lam * terms["kd_loss"]
        return terms
