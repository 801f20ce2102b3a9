"""Feature KD, the FitNets-style hint loss (Romero et al., ICLR 2015): the baseline a feature-
distillation method such as GKD is compared with.

The student's last feature map (B, C_s, T_s, H_s, W_s) is mapped to the teacher's shape by a learned
regressor (a 1 x 1 x 1 convolution over channels, then trilinear resizing of time and space:
`kdhar.objectives.gkd.FeatureAdapter`), and the mean squared error to the frozen teacher's last
feature map is added to the student's cross-entropy. Unlike GKD's feature adapter, which regresses a
detached student feature, the hint's gradient reaches the student's trunk: pulling the trunk towards
the teacher's feature is the method. FitNets trains the hint first and then the classifier; here both
are trained jointly from the first step, as feature-KD baselines commonly are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdhar.objectives.gkd import FeatureAdapter, feature_shape


class FeatureKDStep(nn.Module):
    """CE on the student's logits plus `weight` x MSE(regressor(F_s), F_t).

    The teacher is frozen: in eval mode, without gradients, and not registered (absent from
    `parameters()` and `state_dict()`); the regressor is registered, trained with the student and
    kept in checkpoints, but not part of the logged student.

    Args:
        student: the classifier being trained (`forward_features`, `head`).
        teacher: a network with `forward_features` (the teacher's trunk; its head is never run).
        weight: the hint loss's weight.
        clip: (clip_len, crop) of the run's clips, to size the regressor.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float, clip: tuple[int, int]) -> None:
        super().__init__()
        self.model, self.weight = student, float(weight)
        teacher.eval().requires_grad_(False)
        self.__dict__["teacher"] = teacher
        self.regressor = FeatureAdapter(feature_shape(student, *clip), feature_shape(teacher, *clip))

    def train(self, mode: bool = True) -> FeatureKDStep:
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FeatureKDStep:
        self.teacher._apply(fn, recurse)  # device and dtype moves reach the unregistered teacher too
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor, y: Tensor, **extra: object) -> dict[str, Tensor]:
        """{"loss", "output", "task_loss", "hint_loss"}; `hint_loss` is the MSE before weighting."""
        feature = self.model.forward_features(x)
        output = self.model.head(feature)
        with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                             enabled=x.device.type == "cuda"):
            target = self.teacher.forward_features(x)
        task = F.cross_entropy(output.float(), y)
        hint = F.mse_loss(self.regressor(feature).float(), target.float())
        return {"loss": task + self.weight * hint, "output": output, "task_loss": task, "hint_loss": hint}


__all__ = ["FeatureKDStep"]
