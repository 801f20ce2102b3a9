"""The linear probe on frozen features (`kdhar.probe`), on arrays small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from kdhar.probe import fit_probe, probe_scores, topk_accuracy


def separable(n_per_class: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes, each a tight cloud around its own corner of a 4-d cube: any linear classifier
    that fits separates them."""
    rng = np.random.default_rng(seed)
    centres = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    labels = np.repeat(np.arange(3), n_per_class)
    return centres[labels] + rng.normal(0, 0.1, (len(labels), 4)), labels


def test_linearly_separable_features_score_every_test_video():
    train_x, train_y = separable(seed=0)
    test_x, test_y = separable(n_per_class=3, seed=1)
    scores = probe_scores(train_x, train_y, test_x, test_y)
    assert scores["probe_top1"] == 1.0 and scores["probe_train_top1"] == 1.0
    assert scores["probe_converged"] == 1.0
    assert scores["probe_train_videos"] == 18 and scores["probe_test_videos"] == 9
    assert "probe_top5" not in scores  # 3 classes: the top 5 hold every class, a hit whatever the features


def test_features_that_carry_no_class_score_what_the_majority_class_does():
    # Every video has the same feature: the probe can only learn the class shares, so it names the
    # majority class (2 of 3 training videos) for every test video.
    train_x, train_y = np.ones((3, 2)), np.array([0, 0, 1])
    test_x, test_y = np.ones((4, 2)), np.array([0, 1, 1, 1])
    assert probe_scores(train_x, train_y, test_x, test_y)["probe_top1"] == 0.25


def test_topk_counts_a_hit_when_the_label_is_among_the_k_most_probable():
    probabilities = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.2, 0.3]])
    classes = np.array([10, 11, 12, 13])  # the probe's own class ids, in its column order
    labels = np.array([11, 13, 12])  # second best, best, third best
    assert topk_accuracy(probabilities, classes, labels, ks=(1, 2, 3, 4)) == {
        "probe_top1": pytest.approx(1 / 3), "probe_top2": pytest.approx(2 / 3), "probe_top3": 1.0}
    # A class the probe never saw among the training videos is never a hit.
    assert topk_accuracy(probabilities, classes, np.array([99, 99, 99]), ks=(1, 3))["probe_top3"] == 0.0


def test_a_probe_needs_two_classes_and_one_label_per_row():
    with pytest.raises(ValueError, match="the training videos hold 1 class; a classifier needs at least 2"):
        fit_probe(np.zeros((4, 3)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="4 feature rows but 3 labels"):
        fit_probe(np.zeros((4, 3)), np.array([0, 1, 0]))
