"""Training objectives: step modules whose forward(x, y) returns a dict with "loss"."""

from kdhar.objectives.kd import KDStep, kd_term
from kdhar.objectives.supervised import SupervisedStep

__all__ = ["KDStep", "SupervisedStep", "kd_term"]
