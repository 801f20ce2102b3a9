"""Linear probe, a label-reading measure of frozen features beside label-free retrieval.

A logistic-regression classifier is fitted on the features of every training video (standardised
with the training videos' mean and std, L2-regularised at C = 1, lbfgs) and scored on the test
videos: a test video is a hit at k when its class is among the probe's k most probable. The
features are whatever the caller gives, one row per video (`kdhar.retrieval.video_features`: the
mean over a video's clips of its last feature map max-pooled over (1, 2, 2)); nothing of the
network is trained, so the score says how linearly the frozen features separate the classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

PROBE_TOP_K = (1, 5)
MAX_ITER = 1000  # lbfgs iterations; a probe that stops short is logged as probe_converged 0


def fit_probe(features: np.ndarray, labels: np.ndarray, seed: int = 0, max_iter: int = MAX_ITER) -> Pipeline:
    """Standardisation and a multinomial logistic regression fitted on (N, D) `features`.

    Raises:
        ValueError: fewer than two classes among `labels`, or features and labels of other lengths.
    """
    if len(features) != len(labels):
        raise ValueError(f"linear probe: {len(features)} feature rows but {len(labels)} labels")
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"linear probe: the training videos hold {len(present)} class; a classifier needs at least 2")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as probe_converged instead
        probe.fit(features, labels)
    return probe


def converged(probe: Pipeline) -> bool:
    """Whether the fitted probe's solver stopped before its iteration limit."""
    clf = probe[-1]
    return bool(np.all(clf.n_iter_ < clf.max_iter))


def topk_accuracy(probabilities: np.ndarray, classes: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = PROBE_TOP_K) -> dict[str, float]:
    """Share of rows whose label is among the k classes of highest probability ("probe_top<k>"),
    for the k below the number of classes only (at k >= it every row would be a hit). A label the
    probe never saw is never a hit."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    hit = classes[order] == np.asarray(labels)[:, None]
    return {f"probe_top{k}": float(hit[:, :k].any(axis=1).mean()) for k in ks if k < len(classes)}


def probe_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 ks: Sequence[int] = PROBE_TOP_K, seed: int = 0) -> dict[str, float]:
    """The probe fitted on the training rows and scored on the test rows: `probe_top<k>`, with
    `probe_train_top1` (how well it fits what it was fitted on), `probe_converged` (1 or 0) and the
    number of videos on each side (`probe_train_videos`, `probe_test_videos`)."""
    probe = fit_probe(train_x, train_y, seed)
    classes = probe.classes_
    scores = topk_accuracy(probe.predict_proba(test_x), classes, test_y, ks)
    train_top1 = float((probe.predict(train_x) == np.asarray(train_y)).mean())
    return {**scores, "probe_train_top1": train_top1, "probe_converged": float(converged(probe)),
            "probe_train_videos": float(len(train_x)), "probe_test_videos": float(len(test_x))}


__all__ = ["MAX_ITER", "PROBE_TOP_K", "converged", "fit_probe", "probe_scores", "topk_accuracy"]
