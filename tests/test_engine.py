import math
import pickle
import random

import numpy as np
import pytest
import torch

from kdhar.engine import (
    evaluate,
    get_lr,
    make_scheduler,
    rng_state,
    set_determinism,
    set_rng_state,
    train_one_epoch,
    train_step,
)
from kdhar.models import build_model
from kdhar.objectives import KDStep, SupervisedStep


def toy_batches(n_batches: int, batch_size: int = 8, seed: int = 0) -> list[dict]:
    """Clips whose class is the sign pattern of their mean brightness: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n_batches):
        labels = torch.randint(0, 3, (batch_size,), generator=g)
        clips = torch.randn(batch_size, 3, 4, 12, 12, generator=g) * 0.5
        clips += (labels.float() - 1.0).view(-1, 1, 1, 1, 1)
        index = torch.arange(b * batch_size, (b + 1) * batch_size)
        batches.append({"clip": clips, "label": labels, "index": index, "view": torch.zeros_like(index)})
    return batches


def test_training_lowers_the_loss_and_reports_metrics():
    torch.manual_seed(0)
    model = build_model("tiny3d", num_classes=3, width=4, dropout=0.0)
    step = SupervisedStep(model)
    optimizer = torch.optim.SGD(step.parameters(), lr=0.05, momentum=0.9)
    batches = toy_batches(6)
    batches[2]["skipped"] = 2
    logged = []
    first = train_one_epoch(step, batches, optimizer, "cpu", log=lambda m, s: logged.append((s, m)), log_every=3)
    for epoch in range(1, 4):
        last = train_one_epoch(step, batches, optimizer, "cpu", epoch=epoch, progress=False)
    assert last["loss"] < 0.5 * first["loss"]
    assert last["acc"] > first["acc"]
    assert first["clips"] == 48 and first["skipped"] == 2
    assert first["clips_per_s"] > 0 and first["seconds"] > 0
    assert first["loss"] == pytest.approx(first["task_loss"])
    assert [s for s, _ in logged] == [3, 6]
    # The window's accuracy first (MLflow's compare page plots a run's first logged metric), then
    # its losses, all under a prefix that sorts after the per-epoch metrics.
    assert list(logged[0][1]) == ["window_acc", "window_loss", "window_task_loss", "lr"]
    assert 0 <= logged[0][1]["window_acc"] <= 1
    assert all(key > "val_video_top1" for key in logged[0][1] if key != "lr")


def test_train_step_lays_the_clips_out_as_asked_and_as_the_device_default_otherwise():
    seen = []

    class Probe(SupervisedStep):
        def forward(self, x, y, **extra):
            seen.append(x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous())
            return super().forward(x, y, **extra)

    step = Probe(build_model("tiny3d", num_classes=3, width=4, dropout=0.0))
    optimizer = torch.optim.SGD(step.parameters(), lr=0.01)
    batch = toy_batches(1)[0]
    for channels_last in (None, True, False):
        train_step(step, batch, optimizer, "cpu", channels_last=channels_last)
    assert seen == [False, True, False]  # None: channels_last_3d on CUDA only


def test_scheduler_is_stepped_every_iteration():
    model = build_model("tiny3d", num_classes=3, width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer, "cosine", total_steps=8)
    train_one_epoch(SupervisedStep(model), toy_batches(4, batch_size=2), optimizer, "cpu", scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_kd_epoch_uses_cached_teacher_logits_from_the_batch():
    torch.manual_seed(0)
    student = build_model("tiny3d", num_classes=3, width=4, dropout=0.0)
    teacher = build_model("tiny3d", num_classes=3, width=4)
    batches = toy_batches(2, batch_size=4)
    with torch.no_grad():
        cached = [dict(b, teacher_logits=teacher.eval()(b["clip"])) for b in batches]
    # Same start, same data: live teacher and cached logits must give the same epoch.
    results = []
    for data in (batches, cached):
        torch.manual_seed(1)
        s = build_model("tiny3d", num_classes=3, width=4, dropout=0.0)
        s.load_state_dict(student.state_dict())
        step = KDStep(s, teacher, tau=2.0, lam=1.0)
        results.append(train_one_epoch(step, data, torch.optim.SGD(s.parameters(), lr=0.01), "cpu"))
    assert results[0]["kd_loss"] == pytest.approx(results[1]["kd_loss"], rel=1e-5)
    assert results[0]["loss"] == pytest.approx(results[0]["task_loss"] + results[0]["kd_loss"], rel=1e-5)


def test_nan_loss_raises_a_clear_error():
    model = build_model("tiny3d", num_classes=3, width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = toy_batches(1, batch_size=2)
    batches[0]["clip"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train_one_epoch(SupervisedStep(model), batches, optimizer, "cpu")


class TableModel(torch.nn.Module):
    """Returns the logits stored for each clip id (the clip's first value)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0, 0].long()]


def clip_ids(ids: list[int]) -> torch.Tensor:
    x = torch.zeros(len(ids), 3, 1, 1, 1)
    x[:, 0, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    return x


def test_video_scores_average_clip_softmax():
    # Video 0 (class 0): two clips lean weakly to class 1, one strongly to class 0.
    #   clip-level top-1 says 1 of 3, the mean softmax says class 0.
    # Video 1 (class 2): all three clips favour class 2 -> correct at both levels.
    table = torch.tensor(
        [
            [0.0, 0.3, -5.0],
            [0.0, 0.3, -5.0],
            [6.0, 0.0, -5.0],
            [0.0, 1.0, 2.0],
            [0.0, 0.0, 1.0],
            [1.0, 0.0, 3.0],
        ]
    )
    labels = [0, 0, 0, 2, 2, 2]
    # Clips of one video are split across batches, as a real eval loader does.
    loader = [
        {"clip": clip_ids([0, 1, 3, 4]), "label": torch.tensor([0, 0, 2, 2]), "index": torch.tensor([0, 0, 1, 1])},
        {"clip": clip_ids([2, 5]), "label": torch.tensor([0, 2]), "index": torch.tensor([0, 1])},
    ]
    result = evaluate(TableModel(table), loader, "cpu", num_classes=3)

    probs = table.softmax(dim=1).numpy()
    video0 = probs[[0, 1, 2]].mean(axis=0)
    video1 = probs[[3, 4, 5]].mean(axis=0)
    assert video0.argmax() == 0 and video1.argmax() == 2  # the hand computation itself
    assert result["clip_top1"] == pytest.approx(4 / 6)
    assert result["video_top1"] == 1.0
    assert result["clip_top5"] == 1.0  # top-k capped at 3 classes
    expected_loss = -np.mean([math.log(probs[i, y]) for i, y in enumerate(labels)])
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_array_equal(result["confusion"], [[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    assert result["mean_class_acc"] == 1.0  # class 1 has no videos and is left out
    assert result["per_class"][1] == {"class": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert result["videos"] == 2 and result["clips"] == 6


def test_video_level_errors_and_top5():
    # 7 classes: the true class ranked 4th counts for top-5 but not top-1.
    table = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    loader = [{"clip": clip_ids([0, 1]), "label": torch.tensor([3, 6]), "index": torch.tensor([0, 1])}]
    result = evaluate(TableModel(table), loader, "cpu", num_classes=7)
    assert result["clip_top1"] == 0.5 and result["clip_top5"] == 1.0
    assert result["video_top1"] == 0.5
    assert result["confusion"][3, 0] == 1 and result["confusion"][6, 6] == 1
    assert result["mean_class_acc"] == 0.5


def test_inconsistent_video_labels_are_reported():
    loader = [{"clip": clip_ids([0, 1]), "label": torch.tensor([0, 1]), "index": torch.tensor([5, 5])}]
    with pytest.raises(ValueError, match="video index 5"):
        evaluate(TableModel(torch.eye(2)), loader, "cpu", num_classes=2)


def test_lr_schedules():
    total = 100
    cosine = [get_lr(s, total, 0.1, "cosine") for s in range(total + 1)]
    assert cosine[0] == pytest.approx(0.1) and cosine[50] == pytest.approx(0.05) and cosine[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert [get_lr(s, total, 0.1, "step") for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    assert {get_lr(s, total, 0.1, "constant") for s in range(total)} == {0.1}
    assert get_lr(500, total, 0.1, "cosine") == pytest.approx(0.0)  # past the end: stays at the floor
    with pytest.raises(ValueError, match="'linear'"):
        get_lr(0, total, 0.1, "linear")


def test_warmup_rises_linearly_then_the_schedule_takes_over():
    total, warm = 100, 10
    lrs = [get_lr(s, total, 0.1, "cosine", warmup_steps=warm) for s in range(total)]
    # step s < warm: 0.1 * (s + 1) / 10, so the first step is already non-zero and step 9 reaches 0.1
    assert lrs[:warm] == pytest.approx([0.01 * (s + 1) for s in range(warm)])
    assert lrs[warm:] == pytest.approx([get_lr(s, total, 0.1, "cosine") for s in range(warm, total)])


def test_gradient_clipping_bounds_the_step():
    # Plain SGD without momentum: the parameter moves by lr * grad, so the clipped norm is visible.
    batch = toy_batches(1)[0]
    moved = {}
    for clip in (0.0, 0.01):
        torch.manual_seed(0)
        model = build_model("tiny3d", 3, width=4)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(SupervisedStep(model), batch, optimizer, "cpu", max_grad_norm=clip)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        moved[clip] = float((after - before).norm())
    assert moved[0.01] == pytest.approx(0.01, rel=1e-3)
    assert moved[0.0] > 0.05  # unclipped, the same batch moves the weights much further


def test_make_scheduler_follows_get_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.2)
    scheduler = make_scheduler(optimizer, "step", total_steps=8)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([get_lr(s, 8, 0.2, "step") for s in range(8)])
    with pytest.raises(ValueError, match="schedule"):
        make_scheduler(optimizer, "exp", total_steps=8)


def test_rng_state_round_trips_through_plain_pickle():
    state = rng_state()
    # Plain types only: the standard unpickler (no torch classes) can read it.
    state = pickle.loads(pickle.dumps(state))
    expected = (np.random.rand(), torch.rand(3), random.random())
    np.random.rand(), torch.rand(3)
    set_rng_state(state)
    again = (np.random.rand(), torch.rand(3), random.random())
    assert expected[0] == again[0] and expected[2] == again[2]
    torch.testing.assert_close(expected[1], again[1])


def test_set_determinism_seeds_and_reports():
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        note = set_determinism(7, deterministic=True)
        a = torch.rand(2)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        set_determinism(7, deterministic=True)
        torch.testing.assert_close(a, torch.rand(2))
        assert "deterministic" in note
    finally:
        torch.use_deterministic_algorithms(previous)


def test_plateau_follows_torchs_reduce_lr_on_plateau_threshold_included():
    from kdhar.engine import Plateau

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.01)
    # PCL's code: ReduceLROnPlateau(optimizer, 'min', min_lr=1e-5, patience=..., factor=0.1), torch's
    # default relative threshold 1e-4: a loss creeping down by less than that is a plateau.
    torch_rule = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=0.1, patience=2, min_lr=1e-5)
    plateau = Plateau(0.01, patience=2)
    losses = [1.0 - 1e-5 * i for i in range(6)] + [0.9, 0.8, 0.79999, 0.79998, 0.79997, 0.79996]
    ours, theirs = [], []
    for loss in losses:
        plateau.step(loss)
        torch_rule.step(loss)
        ours.append(0.01 * plateau.scale)
        theirs.append(opt.param_groups[0]["lr"])
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert theirs[3] == pytest.approx(0.001) and theirs[-1] == pytest.approx(0.0001)  # both creeps are plateaus


def test_plateau_cuts_the_lr_tenfold_after_patience_epochs_without_a_new_minimum():
    from kdhar.engine import Plateau

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    plateau = Plateau(0.01, patience=2)
    sched = make_scheduler(opt, "plateau", total_steps=100, plateau=plateau)
    lrs = []
    for loss in (1.0, 0.9, 0.95, 0.92, 0.91, 0.8, 0.85, 0.85, 0.85):  # 3 epochs without a new minimum, twice
        plateau.step(loss)
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.01] * 4)
    assert lrs[4] == pytest.approx(0.001) and lrs[5:8] == pytest.approx([0.001] * 3)
    assert lrs[8] == pytest.approx(0.0001)
    resumed = Plateau(0.01, patience=2)
    resumed.load_state_dict(plateau.state_dict())
    assert resumed.state_dict() == plateau.state_dict()
    floor = Plateau(1e-4, patience=0)
    for loss in (1.0, 1.0, 1.0, 1.0):
        floor.step(loss)
    assert floor.scale == pytest.approx(0.1)  # never below min_lr 1e-5
