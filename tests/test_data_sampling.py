"""Clip index maths: bounds, even spacing, clamping and tuples."""

from __future__ import annotations

import numpy as np
import pytest

from kdhar.data import sampling


def test_span_and_max_start() -> None:
    assert sampling.clip_span(16, 1) == 16
    assert sampling.clip_span(8, 2) == 15
    assert sampling.max_start(100, 16, 2) == 100 - 31
    assert sampling.max_start(10, 16, 1) == 0


def test_train_start_covers_every_valid_start_uniformly() -> None:
    rng = np.random.default_rng(0)
    starts = np.array([sampling.train_clip_start(rng, 40, 8, 2) for _ in range(5000)])
    last = 40 - 15
    assert starts.min() == 0 and starts.max() == last
    counts = np.bincount(starts, minlength=last + 1)
    assert counts.min() > 0.6 * counts.mean()
    # Every drawn clip stays inside the video without clamping.
    assert (starts + 14 <= 39).all()


def test_train_start_is_zero_for_short_videos() -> None:
    rng = np.random.default_rng(0)
    assert {sampling.train_clip_start(rng, 5, 16, 1) for _ in range(20)} == {0}


def test_test_starts_evenly_spaced_from_first_to_last() -> None:
    starts = sampling.test_clip_starts(101, 16, 1, 5)
    assert starts == [0, 21, 42, 64, 85]
    assert np.ptp(np.diff(starts)) <= 1
    assert sampling.test_clip_starts(101, 16, 1, 1) == [42]
    assert sampling.test_clip_starts(8, 16, 1, 3) == [0, 0, 0]  # short video: same clip K times
    with pytest.raises(ValueError, match="num_clips"):
        sampling.test_clip_starts(100, 16, 1, 0)


def test_clip_indices_step_and_clamp() -> None:
    np.testing.assert_array_equal(sampling.clip_indices(3, 4, 2, 100), [3, 5, 7, 9])
    # A 5-frame video and a 6-frame clip: the tail repeats the last frame, never index 5.
    np.testing.assert_array_equal(sampling.clip_indices(0, 6, 1, 5), [0, 1, 2, 3, 4, 4])
    idx = sampling.clip_indices(0, 16, 3, 7)
    assert idx.max() == 6 and (np.diff(idx) >= 0).all()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="clip_len"):
        sampling.clip_indices(0, 0, 1, 10)
    with pytest.raises(ValueError, match="num_frames=0"):
        sampling.max_start(0, 4, 1)


def test_tuple_starts_in_order_without_overlap() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        starts = sampling.tuple_starts(rng, 100, 8, 2, 3, gap=4)
        assert len(starts) == 3
        assert all(b - a == 15 + 4 for a, b in zip(starts, starts[1:]))
        assert starts[-1] + 14 <= 99


def test_tuple_starts_on_short_video_keep_order_inside_video() -> None:
    starts = sampling.tuple_starts(np.random.default_rng(0), 30, 8, 2, 4)
    assert starts == sorted(starts) and len(set(starts)) == 4
    assert starts[-1] == sampling.max_start(30, 8, 2)
    assert sampling.tuple_starts(np.random.default_rng(0), 3, 8, 1, 3) == [0, 0, 0]
