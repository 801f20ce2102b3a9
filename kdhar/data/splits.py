"""A run's three dataset views: training (a class-balanced fraction), validation (held-out training
groups) and test, read from the dataset's split files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdhar.config import RunConfig
from kdhar.data.index import DatasetIndex, fingerprint, load_index
from kdhar.data.subsets import class_balanced_subset, group_holdout


@dataclass
class Splits:
    """The indexes a run trains, validates and tests on, the whole training list they come from
    (`train_list`, retrieval's gallery whatever the fraction and hold-out) and its fingerprint."""

    classes: list[str]
    train: DatasetIndex
    val: DatasetIndex | None
    test: DatasetIndex
    fingerprint: str
    missing: int
    train_list: DatasetIndex


def load_splits(cfg: RunConfig) -> Splits:
    """Train (class-balanced fraction), validation (held-out training groups) and test indexes."""
    d = cfg.data
    split_dir = d.split_dir or None
    train_full = load_index(d.dataset, d.root, d.split, "train", on_missing=d.on_missing, split_dir=split_dir)
    test = load_index(d.dataset, d.root, d.split, "test", on_missing=d.on_missing, split_dir=split_dir)
    train_samples, val_samples = train_full.samples, []
    if d.val_fraction > 0:
        train_samples, val_samples = group_holdout(train_full.samples, d.val_fraction, cfg.optim.seed)
    train_samples = class_balanced_subset(train_samples, d.fraction, cfg.optim.seed)
    return Splits(
        classes=list(train_full.classes),
        train=dataclasses.replace(train_full, samples=train_samples),
        val=dataclasses.replace(train_full, samples=val_samples) if val_samples else None,
        test=test,
        fingerprint=fingerprint(train_full),
        missing=train_full.missing + test.missing,
        train_list=train_full,
    )
