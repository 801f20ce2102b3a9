"""Plain supervised training: cross-entropy on the labels."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class SupervisedStep(nn.Module):
    """Wraps a classifier so that `forward(x, y)` returns the training loss and the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor, **extra: Any) -> dict[str, Tensor]:
        """Returns {"loss", "output", "task_loss"}; `loss` is the mean cross-entropy.

        Extra batch fields (such as cached teacher logits) do not affect plain supervision.
        """
        output = self.model(x)
        task_loss = F.cross_entropy(output.float(), y)
        return {"loss": task_loss, "output": output, "task_loss": task_loss}
