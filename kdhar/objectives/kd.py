"""Hinton-style logit distillation: cross-entropy plus a temperature-softened KL to a frozen teacher."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kd_term(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), averaged over the batch.

    The tau^2 factor undoes the 1/tau^2 by which softening shrinks the soft term's gradient, but
    only in the high-temperature limit (Hinton et al.'s approximation): at tau 1-4 the scaled term's
    gradient is still of the order of the CE gradient or larger (1.8x at tau 4 for an untrained
    10-class student), so its weight is not a neutral "teacher vs labels" ratio at low tau.
    """
    log_q = F.log_softmax(student_logits.float() / tau, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=1)
    return tau * tau * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def balance_scale(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau: float) -> Tensor:
    """The factor that makes `kd_term`'s gradient at the student's logits as large as CE's (the
    "balanced" weighting), detached, so it rescales the soft term without being trained on.

    Both gradients have a closed form at the logits z: CE's is (softmax(z) - onehot(y)) / N and the
    soft term's tau * (softmax(z / tau) - softmax(t / tau)) / N. The factor is the ratio of their
    norms over the batch, kept between 1/tau^2 (the soft term as plain KL) and 1 (Hinton's tau^2 * KL),
    so that a student that already matches its teacher, or one that fits its labels exactly (CE's
    gradient near 0), does not blow the soft term up or switch it off.
    """
    z, t = student_logits.detach().float(), teacher_logits.detach().float()
    n = z.shape[0]
    g_ce = (F.softmax(z, dim=1) - F.one_hot(labels, z.shape[1]).float()) / n
    g_soft = tau * (F.softmax(z / tau, dim=1) - F.softmax(t / tau, dim=1)) / n
    low, high = sorted((1.0, 1.0 / (tau * tau)))
    ratio = g_ce.norm() / g_soft.norm().clamp_min(torch.finfo(torch.float32).tiny)
    return ratio.clamp(low, high)


def uniform_kd_term(teacher_logits: Tensor, tau: float) -> Tensor:
    """`kd_term` of a student that learned nothing (equal logits, a uniform softmax) on the same batch:
    tau^2 * KL(softmax(teacher / tau) || uniform) = tau^2 * (log K - H(softmax(teacher / tau))).

    A student stuck at this level (or above it) has taken nothing from the teacher; the first
    batch's soft loss is no baseline, since an untrained student starts there too.
    """
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=1)
    per_clip = (log_p.exp() * (log_p + math.log(teacher_logits.shape[1]))).sum(dim=1)
    return tau * tau * per_clip.mean()


class LogitKD(nn.Module):
    """The labels-and-teacher term on a student's logits: weighted CE plus `kd_term` to a frozen teacher.

    weighting "mix": (1 - alpha) * CE + alpha * kd_term; "sum": CE + lam * kd_term (the paper's Eq. 7);
    "balanced": (1 - alpha) * CE + alpha * s * kd_term, where s (`balance_scale`, per batch) makes the
    soft term's gradient at the logits as large as CE's, so at alpha 0.5 a distilled student steps
    about as far as its scratch twin at the same lr. A building block: `KDStep` puts it on a student's clip logits, `PCLStep` on its action head inside
    PCL, so both distil the same way.

    The teacher is frozen: always in eval mode, without gradients, and deliberately not registered
    as a submodule, so it is absent from `parameters()` (the optimiser never sees it) and from
    `state_dict()` (checkpoints hold only the student). `to()` / `cuda()` still move it.
    """

    def __init__(self, teacher: nn.Module, tau: float = 4.0, lam: float = 1.0, weighting: str = "sum",
                 alpha: float = 0.5) -> None:
        super().__init__()
        check_kd(tau, weighting, alpha, lam)
        self.tau = float(tau)
        self.weighting = weighting
        # (weight of CE, weight of the soft term)
        self.weights = (1.0, float(lam)) if weighting == "sum" else (1.0 - alpha, float(alpha))
        teacher.eval().requires_grad_(False)
        # Stored in __dict__ so nn.Module does not register it as a child.
        self.__dict__["teacher"] = teacher

    def train(self, mode: bool = True) -> LogitKD:
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LogitKD:
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

    def forward(self, output: Tensor, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None) -> dict[str, Tensor]:
        """Returns {"loss", "task_loss", "kd_loss", "kd_uniform_loss"} for student logits `output` on
        clips `x`; "kd_uniform_loss" (`uniform_kd_term`, not trained on) is the soft loss a uniform
        student would have on this batch, the level below which a student has learned from the teacher.

        Args:
            teacher_logits: cached teacher logits (N, classes); when given the teacher is not run.
        """
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
        w_task, w_kd = self.weights
        out = {"task_loss": task_loss, "kd_loss": kd_loss, "kd_uniform_loss": uniform_kd_term(teacher_logits, self.tau)}
        soft = kd_loss
        if self.weighting == "balanced":
            # Logged as train_kd_balanced_loss: over train_kd_loss it is the epoch's mean scale.
            soft = out["kd_balanced_loss"] = balance_scale(output, teacher_logits, y, self.tau) * kd_loss
        return {"loss": w_task * task_loss + w_kd * soft, **out}


class KDStep(nn.Module):
    """Trains `student` on CE and the soft term `kd_term(student, teacher, tau)` (`LogitKD` on its logits).

    The constructor's defaults are the paper's; runs take theirs from `kdhar.config.KDConfig` (mix).
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, tau: float = 4.0, lam: float = 1.0,
        weighting: str = "sum", alpha: float = 0.5,
    ) -> None:
        super().__init__()
        self.student = student
        self.kd = LogitKD(teacher, tau=tau, lam=lam, weighting=weighting, alpha=alpha)

    @property
    def model(self) -> nn.Module:
        """The network being trained (same name as `SupervisedStep.model`)."""
        return self.student

    @property
    def teacher(self) -> nn.Module:
        return self.kd.teacher

    def run_teacher(self, x: Tensor) -> Tensor:
        """The frozen teacher's float32 logits for `x` (see `LogitKD.run_teacher`)."""
        return self.kd.run_teacher(x)

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None) -> dict[str, Tensor]:
        """Returns {"loss", "output", "task_loss", "kd_loss", "kd_uniform_loss"}; `kd_loss` is the
        tau^2-scaled KL before weighting, `kd_uniform_loss` that of a uniform student (`LogitKD`).

        Args:
            x: clips (N, 3, T, H, W).
            y: labels (N,).
            teacher_logits: cached teacher logits (N, classes); when given the teacher is not run.
        """
        output = self.student(x)
        return {**self.kd(output, x, y, teacher_logits), "output": output}


def check_kd(tau: float, weighting: str, alpha: float, lam: float) -> None:
    """Raises ValueError, naming the value and the valid range, for unusable KD settings."""
    if weighting not in ("mix", "sum", "balanced"):
        raise ValueError(f"KD weighting '{weighting}' is unknown; use mix ((1-alpha)*CE + alpha*KD), sum (CE + lam*KD) "
                         "or balanced (mix with the soft term's gradient scaled to CE's)")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"KD temperature tau must be a number > 0, got {tau} (the paper uses 4)")
    if not (math.isfinite(alpha) and 0 <= alpha <= 1):
        raise ValueError(f"KD alpha must be in [0, 1], got {alpha} (0.5 weighs labels and teacher equally)")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"KD weight lam must be a number >= 0, got {lam} (the paper uses 1)")
