"""Video classifiers: C3D-BN, R3D-18, MC3-18, R(2+1)D-18, the PCL code's R3D-10 and R(2+1)D-10 and a small
student, all with a width knob."""

from kdhar.models.registry import (
    MODALITIES,
    MODELS,
    ClassifierHead,
    VideoClassifier,
    build_model,
    count_params,
    describe,
    residual_frames,
)
from kdhar.models.teacher import Teacher

__all__ = ["MODALITIES", "MODELS", "ClassifierHead", "Teacher", "VideoClassifier", "build_model", "count_params",
           "describe", "residual_frames"]
