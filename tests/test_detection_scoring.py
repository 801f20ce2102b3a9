"""Scoring temporal detections: tIoU, NMS and soft-NMS, decoding windows into a video's segments, and
THUMOS14's mAP under both protocols, against hand-worked values and against plain re-implementations
written here line by line from the two evaluation codes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdhar.detection import (
    TIOUS_GKD,
    TIOUS_THUMOS14,
    Detections,
    decode_video,
    evaluate_detections,
    nms,
    soft_nms,
    temporal_iou,
    window_candidates,
)


def test_tiou_of_hand_picked_pairs() -> None:
    iou = temporal_iou(np.array([[0.0, 10.0], [12.0, 2.0]]), np.array([[5.0, 15.0], [10.0, 20.0], [0.0, 10.0]]))
    assert np.allclose(iou, [[5 / 15, 0.0, 1.0], [7 / 13, 2 / 18, 8 / 12]])  # a reversed segment is sorted
    assert temporal_iou(np.array([[3.0, 3.0]]), np.array([[0.0, 10.0]]))[0, 0] == 0.0  # zero length


def test_soft_nms_decays_overlapping_scores_by_a_gaussian_of_their_tiou() -> None:
    segs = np.array([[0.0, 10.0], [5.0, 15.0], [30.0, 40.0], [0.0, 10.0]])
    idx, scores = soft_nms(segs, np.array([0.9, 0.8, 0.7, 0.0005]), sigma=0.5)
    # [5, 15] overlaps the best by 1/3: 0.8 * exp(-(1/3)^2 / 0.5) = 0.6412; the last starts below 0.001.
    assert idx.tolist() == [0, 2, 1]
    assert np.allclose(scores, [0.9, 0.7, 0.8 * math.exp(-1 / 9 / 0.5)])
    idx, _ = soft_nms(segs, np.array([0.9, 0.8, 0.7, 0.0005]), sigma=0.5, top_k=2)
    assert idx.tolist() == [0, 2]


def test_nms_drops_what_overlaps_a_better_segment_beyond_the_threshold() -> None:
    segs = np.array([[0.0, 10.0], [5.0, 15.0], [1.0, 10.0], [30.0, 40.0]])
    scores = np.array([0.9, 0.8, 0.85, 0.7])
    assert nms(segs, scores, iou_threshold=0.3).tolist() == [0, 3]  # 1/3 > 0.3 and 0.9 > 0.3
    assert nms(segs, scores, iou_threshold=0.5).tolist() == [0, 1, 3]


def reference_soft_nms(segs, scores, sigma, threshold):
    """Soft-NMS as the paper's pseudo-code reads: plain lists."""
    boxes = [(list(s), float(c), i) for i, (s, c) in enumerate(zip(segs, scores)) if c >= threshold]
    out = []
    while boxes:
        best = max(range(len(boxes)), key=lambda j: (boxes[j][1], -j))
        seg, score, i = boxes.pop(best)
        out.append((i, score))
        rest = []
        for s, c, k in boxes:
            inter = max(0.0, min(seg[1], s[1]) - max(seg[0], s[0]))
            iou = inter / (max(seg[1], s[1]) - min(seg[0], s[0])) if inter > 0 else 0.0
            c = c * math.exp(-iou * iou / sigma)
            if c >= threshold:
                rest.append((s, c, k))
        boxes = rest
    return out


def test_soft_nms_matches_a_plain_implementation_on_random_segments() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        starts = rng.uniform(0, 50, 40)
        segs = np.stack([starts, starts + rng.uniform(1, 20, 40)], axis=1)
        scores = rng.uniform(0, 1, 40)
        idx, new = soft_nms(segs, scores, sigma=0.3, score_threshold=0.05)
        ref = reference_soft_nms(segs, scores, 0.3, 0.05)
        assert idx.tolist() == [i for i, _ in ref]
        assert np.allclose(new, [c for _, c in ref])


def test_windows_decode_to_one_video_level_segment_per_action() -> None:
    # Two windows of 8 steps, 2 frames a step, starting at frames 0 and 8, both see an action of class 1
    # over frames 10-18 (steps 5-9 of the first, 1-5 of the second); the video has 20 frames at 10 fps.
    scores_a = np.zeros((8, 2))
    scores_a[6, 1] = 0.9  # centre 6.5: starts 1.5 steps before, ends 2.5 after -> [5, 9] steps -> [10, 18]
    first = window_candidates(scores_a, np.full(8, 1.5), np.full(8, 2.5), window_start=0, frame_interval=2,
                              score_threshold=0.5)
    scores_b = np.zeros((8, 2))
    scores_b[2, 1], scores_b[7, 0] = 0.6, 0.8
    second = window_candidates(scores_b, np.array([1.5] * 7 + [0.5]), np.array([2.5] * 7 + [9.0]), window_start=8,
                               frame_interval=2, valid_steps=6, score_threshold=0.5)  # step 7 is past the end
    assert first.segments.tolist() == [[10.0, 18.0]] and first.labels.tolist() == [1]
    assert second.segments.tolist() == [[10.0, 18.0]] and second.scores.tolist() == [0.6]
    pooled = Detections.concat([first, second])

    hard = decode_video(pooled, num_frames=20, fps=10, method="hard")
    assert hard.segments.tolist() == [[1.0, 1.8]] and hard.scores.tolist() == [0.9] and hard.labels.tolist() == [1]
    soft = decode_video(pooled, num_frames=20, fps=10, method="soft", sigma=0.5)
    assert np.allclose(soft.scores, [0.9, 0.6 * math.exp(-2)])  # the duplicate survives, far lower
    assert decode_video(pooled, num_frames=20, fps=10, top_k=1).scores.tolist() == [0.9]

    # Step 7 of the second window proposes frames [22, 41]: clipped to a 30-frame video, dropped from a
    # 20-frame one, where nothing of it is left.
    late = window_candidates(scores_b, np.full(8, 0.5), np.full(8, 9.0), 8, 2, score_threshold=0.7)
    assert late.segments.tolist() == [[22.0, 41.0]]
    assert decode_video(late, num_frames=30, fps=10).segments.tolist() == [[2.2, 3.0]]
    assert len(decode_video(late, num_frames=20, fps=10)) == 0


GT = {"v1": [(0, 0.0, 10.0), (0, 20.0, 30.0)], "v2": [(1, 5.0, 9.0)]}


def ap(dets, threshold, protocol, gt=GT, ambiguous=None, classes=("A", "B")):
    return evaluate_detections(gt, dets, list(classes), (threshold,), ambiguous, protocol).ap[:, 0]


def test_hand_worked_ap_under_both_protocols() -> None:
    dets = [("v1", 0, 0.0, 10.0, 0.9), ("v1", 0, 2.0, 12.0, 0.8), ("v1", 0, 21.0, 29.0, 0.7)]
    # Ranked TP, FP, TP: recall .5 .5 1, precision 1 .5 2/3.
    # 11-point: precision 1 at recall 0-0.5 (6 points), 2/3 at 0.6-1 (5 points).
    assert ap(dets, 0.5, "thumos14")[0] == pytest.approx((6 + 5 * 2 / 3) / 11)
    # VOC area: 0.5 x 1 + 0.5 x 2/3.
    assert ap(dets, 0.5, "anet")[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert ap(dets, 0.5, "anet")[1] == 0.0  # class B has ground truth but no detection


def test_the_toolkit_matches_each_truth_to_its_best_overlap_and_anet_goes_by_score() -> None:
    dets = [("v1", 0, 0.0, 6.0, 0.9), ("v1", 0, 0.0, 10.0, 0.5)]
    gt = {"v1": [(0, 0.0, 10.0)]}
    # Toolkit: the truth takes [0, 10] (tIoU 1) though [0, 6] (tIoU 0.6) scores higher: FP then TP.
    assert ap(dets, 0.5, "thumos14", gt, classes=["A"])[0] == pytest.approx(0.5)
    # ActivityNet: [0, 6] comes first and takes the truth: TP then FP.
    assert ap(dets, 0.5, "anet", gt, classes=["A"])[0] == pytest.approx(1.0)


def test_a_tiou_equal_to_the_threshold_counts_only_under_anet() -> None:
    dets, gt = [("v1", 0, 0.0, 5.0, 0.9)], {"v1": [(0, 0.0, 10.0)]}
    assert ap(dets, 0.5, "thumos14", gt, classes=["A"])[0] == 0.0  # the toolkit asks for more than 0.5
    assert ap(dets, 0.5, "anet", gt, classes=["A"])[0] == 1.0  # ActivityNet for at least 0.5


def test_detections_touching_an_ambiguous_segment_are_no_false_positives_in_the_toolkit() -> None:
    dets = [("v1", 0, 40.0, 45.0, 0.95), ("v1", 0, 0.0, 10.0, 0.9), ("v1", 0, 20.0, 30.0, 0.8)]
    ambiguous = {"v1": [(44.0, 50.0)]}
    assert ap(dets, 0.5, "thumos14", ambiguous=ambiguous)[0] == 1.0
    # Without it the false positive ranks first: precision 0, 1/2, 2/3 at recall 0, 1/2, 1, whose
    # interpolation is 2/3 at every recall point.
    assert ap(dets, 0.5, "thumos14")[0] == pytest.approx(2 / 3)
    assert ap(dets, 0.5, "anet", ambiguous=ambiguous)[0] == pytest.approx(2 / 3)  # ActivityNet ignores it


def test_a_recall_of_exactly_three_tenths_misses_the_toolkits_fourth_recall_point() -> None:
    gt = {f"v{i}": [(0, 0.0, 10.0)] for i in range(10)}
    dets = [(f"v{i}", 0, 0.0, 10.0, 1.0 - i / 10) for i in range(3)]
    # Recall reaches 3/10 = 0.29999999999999999, below MATLAB's 0:0.1:1 fourth point 0.30000000000000004.
    assert ap(dets, 0.5, "thumos14", gt, classes=["A"])[0] == pytest.approx(3 / 11)


def test_map_averages_classes_with_ground_truth_and_detections_elsewhere_are_false() -> None:
    dets = [("v1", 0, 0.0, 10.0, 0.9), ("v1", 0, 20.0, 30.0, 0.8), ("v9", 1, 0.0, 1.0, 0.99), ("v2", 1, 5.0, 9.0, 0.5)]
    scores = evaluate_detections(GT, dets, ["A", "B", "C"], TIOUS_GKD, protocol="thumos14")
    assert np.isnan(scores.ap[2]).all()  # no ground truth of C in this subset
    assert np.allclose(scores.ap[:2], [[1.0] * 5, [0.5] * 5])  # v9 has no truth: its B detection is false
    assert np.allclose(scores.mean_ap, 0.75) and scores.average == pytest.approx(0.75)
    # ActivityNet's code reads only the videos its ground truth lists: v9's detection is dropped.
    assert np.allclose(evaluate_detections(GT, dets, ["A", "B"], TIOUS_GKD, protocol="anet").ap, 1.0)
    named = scores.metrics("test_")
    assert named["test_map_0.1"] == pytest.approx(0.75) and named["test_ap_0.5_B"] == pytest.approx(0.5)
    assert "test_ap_0.5_C" not in named and named["test_map_avg"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_detections(GT, dets, ["A", "B"], protocol="voc")


# ---- plain re-implementations of the two codes -------------------------------------------------


def interval_overlap(a, b):
    """intervalsingleoverlapvalseconds: union as the span of both."""
    a, b = sorted(a), sorted(b)
    inter = min(a[1], b[1]) - max(a[0], b[0])
    return inter / (max(a[1], b[1]) - min(a[0], b[0])) if inter > 0 else 0.0


def toolkit_ap(gt, dets, amb, label, threshold):
    """TH14eventdetpr.m, statement by statement."""
    npos = sum(1 for rows in gt.values() for r in rows if r[0] == label)
    tpconf, fpconf = [], []
    videos = sorted(set(gt) | {d[0] for d in dets})
    for video in videos:
        g = [r[1:] for r in gt.get(video, []) if r[0] == label]
        a = amb.get(video, [])
        d = sorted([x for x in dets if x[0] == video and x[1] == label], key=lambda x: -x[4])
        if not d:
            continue
        indfree = [1] * len(d)
        for gseg in g:
            free = [k for k in range(len(d)) if indfree[k]]
            if not free:
                continue
            ovs = [interval_overlap(gseg, d[k][2:4]) for k in free]
            best = max(ovs)
            if best > threshold:
                indfree[free[ovs.index(best)]] = 0
        indamb = [sum(interval_overlap(s, x[2:4]) for s in a) for x in d]
        tpconf += [x[4] for x, f in zip(d, indfree) if f == 0]
        fpconf += [x[4] for x, f, m in zip(d, indfree, indamb) if f == 1 and m == 0]
    if not tpconf:
        return 0.0
    conf = [(c, 1) for c in tpconf] + [(c, 2) for c in fpconf]
    conf = sorted(conf, key=lambda x: -x[0])  # Python's sort is stable, as MATLAB's
    tp = fp = 0
    rec, prec = [], []
    for _, flag in conf:
        tp += flag == 1
        fp += flag == 2
        rec.append(tp / npos)
        prec.append(tp / (tp + fp))
    points = [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # MATLAB's 0:0.1:1
    total = 0.0
    for t in points:
        above = [p for p, r in zip(prec, rec) if r >= t]
        total += (max(above) if above else 0.0) / len(points)
    return total


def anet_ap(gt, dets, label, threshold):
    """compute_average_precision_detection + interpolated_prec_rec, statement by statement."""
    truths = [(v, r[1], r[2]) for v, rows in gt.items() for r in rows if r[0] == label]
    preds = [d for d in dets if d[1] == label and d[0] in gt]  # the evaluator drops other videos
    preds = [preds[i] for i in np.array([d[4] for d in preds]).argsort()[::-1]]  # prediction['score'].values.argsort()[::-1]
    if not preds:
        return 0.0
    by_video = {}
    for i, (v, s, e) in enumerate(truths):
        by_video.setdefault(v, []).append((i, s, e))
    lock = [False] * len(truths)
    tp, fp = [0] * len(preds), [0] * len(preds)
    for n, (video, _, s, e, _) in enumerate(preds):
        if video not in by_video:
            fp[n] = 1
            continue
        gts = by_video[video]
        tious = []
        for _, gs, ge in gts:
            inter = max(0.0, min(e, ge) - max(s, gs))
            tious.append(inter / ((ge - gs) + (e - s) - inter))
        for j in np.argsort(np.array(tious))[::-1]:
            if tious[j] < threshold:
                fp[n] = 1
                break
            if lock[gts[j][0]]:
                continue
            tp[n] = 1
            lock[gts[j][0]] = True
            break
        if not tp[n] and not fp[n]:
            fp[n] = 1
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = list(ctp / len(truths)), list(ctp / (ctp + cfp))
    mprec, mrec = [0.0] + prec + [0.0], [0.0] + rec + [1.0]
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mprec[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def random_case(rng):
    videos = [f"video_test_{i:07d}" for i in range(6)]
    gt, amb, dets = {}, {}, []
    for v in videos[:5]:  # the sixth has no annotation at all
        gt[v] = []
        for _ in range(rng.integers(0, 5)):
            s = float(np.round(rng.uniform(0, 60), 1))
            gt[v].append((int(rng.integers(0, 3)), s, s + float(np.round(rng.uniform(1, 8), 1))))
        if rng.random() < 0.4:
            s = float(rng.uniform(0, 60))
            amb[v] = [(s, s + 3.0)]
    for v in videos:
        for _ in range(rng.integers(0, 15)):
            s = float(rng.uniform(0, 60))
            # Rounded scores make ties, which both codes must order the same way.
            dets.append((v, int(rng.integers(0, 3)), s, s + float(rng.uniform(0.5, 9)), float(np.round(rng.random(), 1))))
    for v, rows in gt.items():  # detections near the truth, so that matches happen
        for label, s, e in rows:
            jitter = rng.uniform(-1, 1, 2)
            dets.append((v, label, s + jitter[0], e + jitter[1], float(rng.random())))
    return gt, amb, dets


def test_both_protocols_match_the_plain_implementations_on_random_sets() -> None:
    rng = np.random.default_rng(1)
    for _ in range(25):
        gt, amb, dets = random_case(rng)
        classes = ["A", "B", "C"]
        for protocol in ("thumos14", "anet"):
            scores = evaluate_detections(gt, dets, classes, TIOUS_THUMOS14 + TIOUS_GKD, amb, protocol)
            for label in range(3):
                has_truth = any(r[0] == label for rows in gt.values() for r in rows)
                for j, t in enumerate(TIOUS_THUMOS14 + TIOUS_GKD):
                    if not has_truth:
                        assert np.isnan(scores.ap[label, j])
                        continue
                    want = toolkit_ap(gt, dets, amb, label, t) if protocol == "thumos14" else anet_ap(gt, dets, label, t)
                    assert scores.ap[label, j] == pytest.approx(want, abs=1e-12), (protocol, label, t)
