"""When a run is stuck: its student learned nothing, whatever its loss did.

Every run with labels is judged each epoch (scratch, teachers and distilled students alike): a run
is stuck when its train accuracy is at most STUCK_ACC_FACTOR x chance once STUCK_AFTER_SHARE of its
epochs (equal-sized, so the same share of its optimiser steps) are done. A run is judged only once it
has taken STUCK_MIN_STEPS optimiser steps: after a handful of steps every run is at chance, and a
smoke test of a few steps says nothing about whether its settings can learn. A falling loss does not
clear it: a GKD student's attention-distillation loss falls while its labels stay at chance. A distilled run is judged before that point too when its soft
loss is no lower than that of a uniform student on the same batches (`uniform_kd_term`): such a
student has taken nothing from the teacher either.

The runs' metric, tag and the report keep the name `collapsed` for this verdict, so stored runs,
reports and searches read old and new runs alike.
"""

from __future__ import annotations

# Train accuracy at most this multiple of chance is "at chance": a student merely slow to start is a
# few points above chance, a stuck one predicts one or two classes whatever the clip.
STUCK_ACC_FACTOR = 1.5
# Accuracy alone decides once this share of the epochs is done; earlier, a slow start is normal.
STUCK_AFTER_SHARE = 0.5
# No verdict before this many optimiser steps. The CPU grids' cells take hundreds; a width-8 C3D on
# the 3-class test set first rises above 1.5x chance after about 25 steps at lr 0.05.
STUCK_MIN_STEPS = 50


def uniform_term(term: str) -> str:
    """The name under which a step reports a uniform student's value of its soft loss `term`."""
    return f"{term.removesuffix('_loss')}_uniform_loss"


def is_stuck(train_acc: float, num_classes: int, share_done: float, steps_done: float,
             soft: float | None = None, uniform: float | None = None) -> bool:
    """Whether a run is stuck after an epoch.

    Args:
        train_acc: top-1 train accuracy of the epoch.
        num_classes: classes of the task (chance is 1 / num_classes).
        share_done: the share of the run's epochs done, this one included (0 < share <= 1).
        steps_done: the optimiser steps taken so far.
        soft: a distilled run's mean soft loss over the epoch, or None.
        uniform: a uniform student's soft loss on the same batches (`uniform_kd_term`), or None.
    """
    if steps_done < STUCK_MIN_STEPS or train_acc > STUCK_ACC_FACTOR / num_classes:
        return False
    if share_done >= STUCK_AFTER_SHARE:
        return True
    return soft is not None and uniform is not None and soft >= uniform


def stuck_reason(train_acc: float, num_classes: int, done: int, epochs: int, soft: float | None = None,
                 uniform: float | None = None) -> str:
    """Why a run is stuck, in one line (printed at the end of a stuck run)."""
    text = (f"train accuracy {train_acc:.3f} is at most {STUCK_ACC_FACTOR:g}x chance ({1 / num_classes:.3f}) "
            f"after {done} of {epochs} epochs")
    if soft is not None and uniform is not None:
        relation = "at or above" if soft >= uniform else "below"
        text += f"; soft loss {soft:.3f}, {relation} a uniform student's {uniform:.3f}"
    return text


__all__ = ["STUCK_ACC_FACTOR", "STUCK_AFTER_SHARE", "STUCK_MIN_STEPS", "is_stuck", "stuck_reason", "uniform_term"]
