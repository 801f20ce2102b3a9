"""Training objectives: step modules whose forward(x, y) returns a dict with "loss", and the factory
that builds one from method names (`build_objective`)."""

from kdhar.objectives.factory import Objective, Teacher, build_objective
from kdhar.objectives.kd import KDStep, balance_scale, kd_term, uniform_kd_term
from kdhar.objectives.stuck import is_stuck
from kdhar.objectives.supervised import SupervisedStep

__all__ = ["KDStep", "Objective", "balance_scale", "SupervisedStep", "Teacher", "build_objective", "is_stuck", "kd_term",
           "uniform_kd_term"]
