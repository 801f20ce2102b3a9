"""Hinton-style logit distillation: cross-entropy plus a temperature-softened KL to a frozen teacher."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kd_term(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), averaged over the batch.

    The tau^2 factor keeps the gradient size of the soft term independent of the temperature.
    """
    log_q = F.log_softmax(student_logits.float() / tau, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=1)
    return tau * tau * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


class KDStep(nn.Module):
    """Trains `student` on CE(student, y) + lam * kd_term(student, teacher, tau).

    The teacher is frozen: always in eval mode, without gradients, and deliberately not registered
    as a submodule, so it is absent from `parameters()` (the optimiser never sees it) and from
    `state_dict()` (checkpoints hold only the student). `to()` / `cuda()` still move it.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, tau: float = 4.0, lam: float = 1.0) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"KD temperature tau must be > 0, got {tau}")
        if not lam >= 0:
            raise ValueError(f"KD weight lam must be >= 0, got {lam}")
        self.student = student
        self.tau = float(tau)
        self.lam = float(lam)
        teacher.eval().requires_grad_(False)
        # Stored in __dict__ so nn.Module does not register it as a child.
        self.__dict__["teacher"] = teacher

    @property
    def model(self) -> nn.Module:
        """The network being trained (same name as `SupervisedStep.model`)."""
        return self.student

    def train(self, mode: bool = True) -> KDStep:
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> KDStep:
        # Device/dtype moves must reach the unregistered teacher too.
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def run_teacher(self, x: Tensor) -> Tensor:
        """The frozen teacher's float32 logits for `x` (bf16 autocast on CUDA).

        no_grad rather than inference_mode: the result is a target inside an autograd graph,
        which inference tensors may not be.
        """
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            return self.teacher(x).float()

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None) -> dict[str, Tensor]:
        """Returns {"loss", "output", "task_loss", "kd_loss"}; `kd_loss` is the tau^2-scaled KL before lam.

        Args:
            x: clips (N, 3, T, H, W).
            y: labels (N,).
            teacher_logits: cached teacher logits (N, classes); when given the teacher is not run.
        """
        output = self.student(x)
        if teacher_logits is None:
            teacher_logits = self.run_teacher(x)
        else:
            teacher_logits = teacher_logits.to(device=output.device, dtype=torch.float32)
        if teacher_logits.shape != output.shape:
            raise ValueError(
                f"teacher logits have shape {tuple(teacher_logits.shape)} but the student's are "
                f"{tuple(output.shape)}: teacher and student must be built for the same classes"
            )
        task_loss = F.cross_entropy(output.float(), y)
        kd_loss = kd_term(output, teacher_logits, self.tau)
        return {"loss": task_loss + self.lam * kd_loss, "output": output, "task_loss": task_loss, "kd_loss": kd_loss}
