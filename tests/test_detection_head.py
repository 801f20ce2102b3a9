"""The anchor-free temporal detector: taps on every registered trunk, the head's targets on a
hand-made window, focal and GIoU losses against hand-worked values, and a step that learns."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as torchvision_focal

from kdhar.models import MODELS
from kdhar.models.detector import TAPS, build_detector, tap_lengths
from kdhar.objectives.detection import (
    DetectionStep,
    detection_losses,
    giou_1d,
    head_targets,
    sigmoid_focal_loss,
)


def test_every_registered_trunk_has_two_taps_and_the_middle_one_is_finer() -> None:
    assert set(TAPS) == set(MODELS)
    for arch in TAPS:
        middle, last = tap_lengths(arch, 128)
        assert middle >= last >= 16, arch  # 128-step windows keep T' >= 16 at both taps
    assert tap_lengths("c3d", 256) == (64, 32)  # as I3D's Mixed_4f and Mixed_5c on GKD's 256-frame windows


def test_the_detector_returns_per_step_logits_and_distances_from_both_taps() -> None:
    torch.manual_seed(0)
    model = build_detector("tiny3d", num_classes=3, width=4, head_channels=8, modality="res")
    x = torch.randn(2, 3, 32, 32, 32)
    middle, last = model.forward_taps(x)
    assert middle.shape[:3] == (2, 16, 16) and last.shape[:3] == (2, 16, 8)
    out = model(x)
    assert out["logits"].shape == (2, 16, 3) and out["distances"].shape == (2, 16, 2) and out["stride"] == 2.0
    assert (out["distances"] >= 0).all()
    assert torch.sigmoid(out["logits"]).mean().item() == pytest.approx(0.01, abs=0.01)  # the focal prior
    with pytest.raises(ValueError, match="no detection taps"):
        build_detector("i3d", 3)


def window():
    """16 window steps, head stride 2 (8 head steps, centres 1, 3, ..., 15), an action of class 1 over
    steps 3-9, an Ambiguous span over 12-14 and the video ending at step 14."""
    return dict(segments=torch.tensor([[3.0, 9.0]]), labels=torch.tensor([1]), ambiguous=torch.tensor([[12.0, 14.0]]),
                valid_steps=14, num_steps=8, stride=2.0, num_classes=3)


def test_targets_of_a_hand_made_window() -> None:
    t = head_targets(**window())
    # Centres 5 and 7 lie strictly inside [3, 9]; 3 and 9 sit on its ends.
    assert t.positive.tolist() == [False, False, True, True, False, False, False, False]
    assert t.classes[2].tolist() == [0, 1, 0] and t.classes[[0, 1, 4, 5]].sum() == 0
    assert t.distances[2].tolist() == [1.0, 2.0] and t.distances[3].tolist() == [2.0, 1.0]  # head steps
    # Centre 13 is Ambiguous and centre 15 past the video's end: the class loss leaves both out.
    assert t.counted.tolist() == [True] * 6 + [False, False]


def test_a_step_inside_two_segments_learns_the_shorter() -> None:
    w = window() | dict(segments=torch.tensor([[3.0, 9.0], [0.0, 16.0]]), labels=torch.tensor([1, 0]),
                        ambiguous=torch.zeros(0, 2), valid_steps=16)
    t = head_targets(**w)
    assert t.positive.all() and t.counted.all()
    assert t.classes.argmax(dim=1).tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert t.distances[0].tolist() == [0.5, 7.5] and t.distances[3].tolist() == [2.0, 1.0]


def test_losses_of_a_hand_made_window() -> None:
    t = head_targets(**window())
    losses = detection_losses(torch.zeros(1, 8, 3), torch.ones(1, 8, 2), [t])
    # p = 0.5 everywhere: each counted element costs alpha_t x 0.25 x ln 2; 2 positive elements
    # (alpha 0.25) and 16 negative ones (0.75) over 6 counted steps, divided by 2 positive steps.
    assert losses["cls_loss"].item() == pytest.approx((2 * 0.25 + 16 * 0.75) * 0.25 * math.log(2) / 2)
    # Predicted (1, 1) against (1, 2) and (2, 1): each overlaps 2 of 3 steps.
    assert losses["reg_loss"].item() == pytest.approx(1 / 3)
    assert losses["num_positive"].item() == 2


def test_giou_of_hand_picked_segments() -> None:
    pred = torch.tensor([[0.0, 1.0], [0.0, 4.0], [0.0, 2.0]])
    target = torch.tensor([[2.0, 3.0], [1.0, 2.0], [0.0, 2.0]])
    # Disjoint: IoU 0, hull 3, union 2 -> -1/3. Nested: 1/4. Equal: 1.
    assert giou_1d(pred, target).tolist() == pytest.approx([-1 / 3, 1 / 4, 1.0])


def test_focal_loss_matches_torchvision() -> None:
    torch.manual_seed(1)
    logits, targets = torch.randn(50, 4) * 3, (torch.rand(50, 4) < 0.2).float()
    assert torch.allclose(sigmoid_focal_loss(logits, targets), torchvision_focal(logits, targets, reduction="none"))


def test_a_window_without_actions_has_no_box_loss_but_keeps_the_graph() -> None:
    w = window() | dict(segments=torch.zeros(0, 2), labels=torch.zeros(0, dtype=torch.long))
    distances = torch.ones(1, 8, 2, requires_grad=True)
    losses = detection_losses(torch.zeros(1, 8, 3), distances, [head_targets(**w)])
    assert losses["reg_loss"].item() == 0.0 and losses["num_positive"].item() == 0
    losses["reg_loss"].backward()
    assert distances.grad is not None


def test_the_detection_step_lowers_its_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    step = DetectionStep(build_detector("tiny3d", num_classes=2, width=4, head_channels=8))
    batch = dict(clip=torch.randn(2, 3, 16, 32, 32), segments=[torch.tensor([[2.0, 10.0]]), torch.tensor([[6.0, 14.0]])],
                 labels=[torch.tensor([0]), torch.tensor([1])], ambiguous=[torch.zeros(0, 2)] * 2,
                 valid_steps=torch.tensor([16, 16]))
    opt = torch.optim.Adam(step.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        out = step(**batch)
        first = first if first is not None else out["loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["num_positive"].item() == 8  # head stride 2: centres 3, 5, 7, 9 and 7, 9, 11, 13
    assert step(**batch)["loss"].item() < 0.7 * first
