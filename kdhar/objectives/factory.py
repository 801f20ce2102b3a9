"""One factory from method names to a built objective, so the training loop never learns a method.

`build_objective` turns the run's configuration and its teacher (or none) into an `Objective`: how to
wrap the student into a step module, the knobs to log, the tags that say what the run is, and what
each batch needs beyond the clip (cached teacher logits). Teacher handling and the logit cache live
here and in the step modules, not in `kdhar.train`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdhar.config import RunConfig
from kdhar.objectives.kd import KDStep, check_kd, is_collapsed
from kdhar.objectives.supervised import SupervisedStep

@dataclass
class Teacher:
    """A frozen teacher and where it came from."""

    model: nn.Module
    uri: str
    classes: list[str]
    arch: str | None = None
    run_id: str | None = None
    clip: tuple[int, int] | None = None  # (frames, crop) a logged teacher's graph takes; None: any


@dataclass
class Objective:
    """A training method, built: everything `run_training` needs to know about it.

    Attributes:
        name: "supervised" or "kd-<method>"; the run's `method` tag.
        make_step: wraps the network being trained into a step module whose forward(x, y, **extra)
            returns {"loss", "output", ...named "*_loss" terms}.
        params: the method's knobs, logged as MLflow params (only those that act in this run).
        tags: what the run is (method, teacher run, cache key).
        teacher: the frozen teacher, if any (its classes are checked against the dataset).
        batch_extras: adds what a batch needs beyond the clip (cached teacher logits), or None.
        collapse_term: the loss term whose rise, with train accuracy at chance, marks a collapse.
    """

    name: str
    make_step: Callable[[nn.Module], nn.Module]
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    teacher: Teacher | None = None
    batch_extras: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None
    collapse_term: str | None = None

    def collapsed(self, train_acc: float, num_classes: int, start: float, end: float) -> bool:
        """Whether the run collapsed, from the `collapse_term` loss at the start and over the last epoch."""
        return self.collapse_term is not None and is_collapsed(train_acc, num_classes, start, end)


def build_objective(
    cfg: RunConfig, teacher: Teacher | None = None, *, cache_teacher: bool = False, device: str | None = None
) -> Objective:
    """The objective for a run: supervised without a teacher, logit KD with one.

    Args:
        cfg: the run's configuration (`cfg.kd` holds the KD knobs, `cfg.data.views` the replayed views).
        teacher: the frozen teacher, or None for a scratch/teacher run.
        cache_teacher: look teacher logits up in a cache of the replayed views instead of running
            the teacher each step; needs `cfg.data.views` > 0.
        device: where the cache is computed on first use.

    Raises:
        ValueError: unusable KD settings, or a cache without replayed views.
    """
    if teacher is None:
        return Objective(name="supervised", make_step=SupervisedStep, tags={"method": "supervised"})
    kd = cfg.kd
    check_kd(kd.tau, kd.weighting, kd.alpha, kd.lam)
    tags = {"method": "kd-logit", "teacher_run_id": teacher.run_id or "", "teacher_uri": teacher.uri}
    extras = None
    if cache_teacher:
        if cfg.data.views < 1:
            raise ValueError(
                "the teacher-logit cache replays a fixed set of views: set views (e.g. --views 4) on this "
                "run and on its scratch twin, so both see the same number of augmented views"
            )
        from kdhar.cache import TeacherLogitCache

        cache = TeacherLogitCache.build(teacher, cfg, views=cfg.data.views, device=device)
        tags["teacher_cache"] = cache.key

        def extras(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return {"teacher_logits": cache.lookup(batch)}

    def make_step(student: nn.Module) -> nn.Module:
        return KDStep(student, teacher.model, tau=kd.tau, lam=kd.lam, weighting=kd.weighting, alpha=kd.alpha)

    return Objective(
        name="kd-logit", make_step=make_step,
        params={f"kd.{k}": v for k, v in kd.method_params().items()}, tags=tags, teacher=teacher,
        batch_extras=extras, collapse_term="kd_loss",
    )
