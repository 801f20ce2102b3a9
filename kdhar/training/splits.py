"""The class-set check on models from elsewhere; a run's splits themselves are `kdhar.data.splits`'s."""

from __future__ import annotations

from kdhar.data.splits import Splits, load_splits

__all__ = ["Splits", "check_same_classes", "load_splits"]


def check_same_classes(source: str, classes: list[str], dataset_classes: list[str]) -> None:
    """Refuses a model whose class set differs from the dataset's (before any training)."""
    if list(classes) != list(dataset_classes):
        raise ValueError(
            f"{source} was trained on {len(classes)} classes ({', '.join(classes[:3])}, ...) but the "
            f"dataset has {len(dataset_classes)} ({', '.join(dataset_classes[:3])}, ...); use a model "
            "trained on the same class set"
        )
