"""A run's three dataset views: training (a class-balanced fraction), validation (held-out training
groups) and test, read from the dataset's split files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kdhar.config import RunConfig
from kdhar.data.index import DatasetIndex, fingerprint, load_index
from kdhar.data.subsets import class_balanced_subset, group_holdout
from kdhar.data.thumos14 import DetectionIndex, detection_fingerprint, load_detection_index


@dataclass
class Splits:
    """The indexes a run trains, validates and tests on, the whole training list they come from
    (`train_list`, retrieval's gallery whatever the fraction and hold-out) and its fingerprint."""

    classes: list[str]
    train: DatasetIndex | DetectionIndex
    val: DatasetIndex | DetectionIndex | None
    test: DatasetIndex | DetectionIndex
    fingerprint: str
    missing: int
    train_list: DatasetIndex | DetectionIndex


def part_fingerprint(part: DatasetIndex | DetectionIndex) -> str:
    """The fingerprint of either kind of index (what a run's data lineage records)."""
    return detection_fingerprint(part) if isinstance(part, DetectionIndex) else fingerprint(part)


def load_splits(cfg: RunConfig) -> Splits:
    """Train (class-balanced fraction), validation (held-out training groups) and test indexes;
    for a detection run, `load_detection_splits`'s."""
    if cfg.task == "detection":
        return load_detection_splits(cfg)
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


def load_detection_splits(cfg: RunConfig) -> Splits:
    """THUMOS14's validation videos (training, less a held-out share for validation, then a share
    `fraction` of the rest) and its test videos.

    THUMOS14 names no groups, so validation videos are drawn at random (seeded); on the synthetic
    set they share looks with training videos, which makes validation scores optimistic, but they
    only pick the champion. The fraction is nested: a smaller one is a part of a larger one.
    """
    d = cfg.data
    annotations = d.split_dir or None
    full = load_detection_index(d.root, "train", annotations, on_missing=d.on_missing)
    test = load_detection_index(d.root, "test", annotations, on_missing=d.on_missing)
    order = np.random.default_rng([cfg.optim.seed, 14]).permutation(len(full.videos))
    held = min(len(full.videos) - 1, int(np.ceil(d.val_fraction * len(full.videos)))) if d.val_fraction > 0 else 0
    val = [full.videos[i] for i in sorted(order[:held])]
    rest = order[held:]
    kept = sorted(rest[:max(1, int(np.ceil(d.fraction * len(rest))))])
    train = [full.videos[i] for i in kept]
    return Splits(
        classes=list(full.classes),
        train=dataclasses.replace(full, videos=train),
        val=dataclasses.replace(full, videos=val) if val else None,
        test=test,
        fingerprint=detection_fingerprint(full),
        missing=full.missing + test.missing,
        train_list=full,
    )
