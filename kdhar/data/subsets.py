"""Training subsets: class-balanced fractions and group-wise validation hold-out."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from kdhar.data.index import VideoSample


def class_balanced_subset(samples: list[VideoSample], fraction: float, seed: int) -> list[VideoSample]:
    """Keeps `fraction` of each class's videos (at least one per class).

    Each class's videos are ranked once by a permutation drawn from (`seed`, class), and a subset
    is a prefix of that ranking. So a smaller fraction is always a subset of a larger one with the
    same seed, and results at 2 % and 25 % differ only by the videos added.

    Returns:
        The kept samples, in their input order.

    Raises:
        ValueError: `fraction` is not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    by_class: dict[int, list[VideoSample]] = defaultdict(list)
    for sample in samples:
        by_class[sample.label].append(sample)
    kept: set[VideoSample] = set()
    for label, members in by_class.items():
        # Sorting first makes the ranking independent of the order the index listed the files in.
        members = sorted(members, key=lambda s: str(s.path))
        order = np.random.default_rng([seed, label]).permutation(len(members))
        count = max(1, int(round(fraction * len(members))))
        kept.update(members[i] for i in order[:count])
    return [s for s in samples if s in kept]


def group_holdout(
    samples: list[VideoSample], val_fraction: float, seed: int
) -> tuple[list[VideoSample], list[VideoSample]]:
    """Splits `samples` into (train, val) by whole groups, so no validation group is seen in training.

    About `val_fraction` of the groups (at least one, never all) go to validation; the test split
    is not involved.

    Raises:
        ValueError: `val_fraction` is not in [0, 1), or there are fewer than two groups to split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return list(samples), []
    groups = sorted({s.group for s in samples})
    if len(groups) < 2:
        raise ValueError(
            f"cannot hold out validation groups from {len(groups)} group(s); set val_fraction=0 "
            f"or use a dataset with more groups"
        )
    order = np.random.default_rng(seed).permutation(len(groups))
    count = min(len(groups) - 1, max(1, int(round(val_fraction * len(groups)))))
    val_groups = {groups[i] for i in order[:count]}
    train = [s for s in samples if s.group not in val_groups]
    val = [s for s in samples if s.group in val_groups]
    return train, val

