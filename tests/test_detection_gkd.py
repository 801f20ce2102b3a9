"""GKD's detection terms (../shared/methods/gkd.md, detection) term by term on hand-made tensors and a
tiny detector: foreground and background features, the gaps the background branch learns, each
pass's loss as the sum of its terms, which parameters each pass trains, generative distillation's
target, attention distillation summed over the taps, heterogeneous pairs through the adapters, the
score-distillation baseline, and the logged state a teacher is rebuilt from."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdhar.config import GKDConfig
from kdhar.models.detector import build_detector, tap_shapes
from kdhar.objectives.detection import background_targets, batch_targets, detection_losses, gaps
from kdhar.objectives.detection_gkd import (DetectionGKDStep, attach_attention, background, detector_state, foreground,
                                            load_detector_state)
from kdhar.objectives.detection_kd import DetectionKDStep, bernoulli_kl, score_kd_loss, to_steps
from kdhar.objectives.gkd import cvae_loss

WINDOW = (16, 32)  # (steps, crop)
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def detector(arch: str = "tiny3d", width: int = 2, seed: int = 0, attention: bool = True):
    torch.manual_seed(seed)
    model = build_detector(arch, 3, width=width, head_channels=8)
    cvaes = attach_attention(model, *WINDOW) if attention else None
    return model, cvaes


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(clip=torch.rand(2, 3, WINDOW[0], WINDOW[1], WINDOW[1], generator=g),
                segments=[torch.tensor([[2.0, 7.0], [9.0, 14.0]]), torch.tensor([[4.0, 12.0]])],
                labels=[torch.tensor([0, 2]), torch.tensor([1])], ambiguous=[torch.zeros(0, 2), torch.tensor([[0.0, 2.0]])],
                valid_steps=torch.tensor([16, 14]))


def make_step(student=("tiny3d", 2), teacher=("c3d", 2), epochs: int = 4, **cfg) -> DetectionGKDStep:
    model, cvaes = detector(*student, seed=0)
    parts = detector(*teacher, seed=1) if teacher is not None else (None, None)
    config = GKDConfig(method="gkd", attention=True, beta=10.0, **cfg)
    return DetectionGKDStep(model, cvaes, config, reg_weight=0.5, bg_weight=35.0, epochs=epochs, window=WINDOW,
                            teacher=parts[0], teacher_cvaes=parts[1]).train()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.endswith(BN_STATS)}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# ---------------------------------------------------------------- hand-made tensors


def test_foreground_and_background_weigh_the_feature_by_a_and_by_one_minus_a_over_their_means():
    feature = torch.arange(1.0, 1 + 2 * 2 * 3 * 1 * 1).reshape(2, 2, 3, 1, 1)
    attention = torch.tensor([[[0.5, 1.0, 0.0], [0.25, 0.25, 1.0]],
                              [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    # Window 0: mean(A) = 3 / 6, mean(1 - A) = 3 / 6. Window 1: both 1 / 2 as well.
    fg, bg = foreground(feature, attention), background(feature, attention)
    assert torch.allclose(fg[0, :, :, 0, 0], feature[0, :, :, 0, 0] * attention[0] / 0.5)
    assert torch.allclose(bg[0, :, :, 0, 0], feature[0, :, :, 0, 0] * (1 - attention[0]) / 0.5)
    assert torch.allclose(fg[1, 1], torch.zeros(3, 1, 1)) and torch.allclose(bg[1, 0], torch.zeros(3, 1, 1))
    # The two parts recompose the feature: F = mean(A) * fg + mean(1 - A) * bg, window by window.
    a = attention[..., None, None]
    recomposed = a.mean(dim=(1, 2), keepdim=True) * fg + (1 - a).mean(dim=(1, 2), keepdim=True) * bg
    assert torch.allclose(recomposed, feature)


def test_a_window_is_weighted_by_its_own_attention_not_its_batch():
    feature, attention = torch.rand(3, 4, 5, 2, 2), torch.rand(3, 4, 5)
    alone = foreground(feature[1:2], attention[1:2])
    assert torch.allclose(foreground(feature, attention)[1:2], alone)


@pytest.mark.parametrize(("segments", "valid", "expected"), [
    ([[2.0, 5.0], [4.0, 8.0], [10.0, 12.0]], 16, [[0.0, 2.0], [8.0, 10.0], [12.0, 16.0]]),
    ([[0.0, 3.0], [6.0, 16.0]], 16, [[3.0, 6.0]]),
    ([], 10, [[0.0, 10.0]]),
    ([[4.0, 20.0]], 12, [[0.0, 4.0]]),  # a segment past the valid steps ends the gaps there
])
def test_the_gaps_between_segments_are_the_complementary_segments(segments, valid, expected):
    assert gaps(torch.tensor(segments).reshape(-1, 2), valid).tolist() == expected


def test_background_targets_regress_the_gaps_and_call_every_step_background():
    out = {"logits": torch.zeros(1, 8, 3), "stride": 2.0}
    segs, amb = [torch.tensor([[4.0, 10.0]])], [torch.zeros(0, 2)]
    [t] = background_targets(out, segs, amb, torch.tensor([16]))
    assert t.classes.sum() == 0
    # Head step centres 1, 3, ..., 15: inside the gaps (0, 4) and (10, 16).
    assert t.positive.tolist() == [True, True, False, False, False, True, True, True]
    assert t.distances[0].tolist() == [0.5, 1.5] and t.distances[5].tolist() == [0.5, 2.5]
    assert t.counted.all()


def test_bernoulli_kl_of_the_per_step_scores_matches_its_formula():
    t, s = torch.tensor([[[2.0, -1.0]]]), torch.tensor([[[0.0, 1.0]]])
    for tau in (1.0, 4.0):
        p, q = torch.sigmoid(t / tau), torch.sigmoid(s / tau)
        expected = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
        assert torch.allclose(bernoulli_kl(t, s, tau), expected, atol=1e-6)
    assert torch.allclose(bernoulli_kl(t, t, 2.0), torch.zeros_like(t), atol=1e-7)


def test_score_kd_averages_over_the_valid_steps_scaled_by_tau_squared():
    teacher = torch.tensor([[[3.0], [3.0], [-3.0]]])
    student = torch.tensor([[[0.0], [3.0], [50.0]]])  # the last step lies past the video's end
    valid = torch.tensor([[True, True, False]])
    tau = 2.0
    per_step = bernoulli_kl(teacher, student, tau).sum(-1)[0]
    assert score_kd_loss(teacher, student, valid, tau).item() == pytest.approx(tau * tau * per_step[:2].mean().item())


def test_teacher_scores_are_resized_over_time_to_the_students_steps():
    logits = torch.arange(4.0).reshape(1, 4, 1)
    assert to_steps(logits, 4) is logits
    assert to_steps(logits, 8).shape == (1, 8, 1)
    assert to_steps(logits, 2)[0, :, 0].tolist() == pytest.approx([0.5, 2.5])


# ---------------------------------------------------------------- the two passes, term by term


def test_the_cvae_pass_is_the_vae_loss_plus_gd_summed_over_both_taps():
    step = make_step()
    step.set_pass("cvae")
    b = batch()
    torch.manual_seed(5)
    out = step(**b)
    torch.manual_seed(5)
    with torch.no_grad():
        taps = step.model.forward_taps(b["clip"])
        atts = step.model.attention.weights(taps)
        recon = kl = gd = 0.0
        for level, (cvae, f, a) in enumerate(zip(step.cvaes, taps, atts)):
            mu, logvar, _, regen = cvae(f, a)
            terms = cvae_loss(f, regen, mu, logvar, a)
            recon, kl = recon + terms["recon_loss"], kl + terms["kl_loss"]
            adapter, att_adapter = step.adapters[level], step.attention_adapters[level]
            # GD's target: the *teacher's* CVAE on the *student's* feature and attention, adapted.
            target = step.teacher_cvaes[level](adapter(f), att_adapter(a))[3]
            gd = gd + F.mse_loss(adapter(regen), target)
    assert out["recon_loss"].item() == pytest.approx(recon.item(), rel=1e-5)
    assert out["kl_loss"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out["gd_loss"].item() == pytest.approx(gd.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((recon + 0.1 * kl + 0.01 * gd).item(), rel=1e-5)


def test_the_net_pass_is_fg_detection_plus_weighted_background_ramped_regeneration_and_beta_ad():
    step = make_step(epochs=100)  # the ramp runs over 0.1 x 100 = 10 epochs of one step each
    b = batch()
    torch.manual_seed(7)
    out = step(**b)
    ramp = step.ramp
    torch.manual_seed(7)
    with torch.no_grad():
        taps = step.model.forward_taps(b["clip"])
        atts = step.model.attention.weights(taps)
        fg = step.model.head(tuple(foreground(f, a) for f, a in zip(taps, atts)), WINDOW[0])
        det = detection_losses(fg["logits"], fg["distances"], batch_targets(fg, b["segments"], b["labels"],
                                                                           b["ambiguous"], b["valid_steps"]))
        bg = step.model.head(tuple(background(f, a) for f, a in zip(taps, atts)), WINDOW[0])
        bg_det = detection_losses(bg["logits"], bg["distances"],
                                  background_targets(bg, b["segments"], b["ambiguous"], b["valid_steps"]))
        rec = sum(F.mse_loss(c.inference(a), f) for c, f, a in zip(step.cvaes, taps, atts))
        t_taps = step.teacher.forward_taps(b["clip"])
        t_atts = step.teacher.attention.weights(t_taps)
        ad = sum(F.mse_loss(adapt(a), t) for adapt, a, t in zip(step.attention_adapters, atts, t_atts))
        align = sum(F.mse_loss(adapt(f), t) for adapt, f, t in zip(step.adapters, taps, t_taps))
    bg_loss = bg_det["cls_loss"] + 0.5 * bg_det["reg_loss"]
    for name, value in (("cls_loss", det["cls_loss"]), ("reg_loss", det["reg_loss"]), ("bg_loss", bg_loss),
                        ("rec_loss", rec), ("ad_loss", ad), ("align_loss", align)):
        assert out[name].item() == pytest.approx(value.item(), rel=1e-5), name
    total = det["cls_loss"] + 0.5 * det["reg_loss"] + 35.0 * bg_loss + ramp * 0.5 * rec + 10.0 * ad + align
    assert ramp == pytest.approx(0.1) and out["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_the_background_weight_and_beta_are_the_knobs_they_say():
    b = batch()
    losses = {}
    for bg_weight, beta in ((35.0, 10.0), (0.0, 10.0), (35.0, 0.0)):
        step = make_step()
        step.bg_weight, step.cfg = bg_weight, GKDConfig(method="gkd", attention=True, beta=beta)
        torch.manual_seed(3)
        losses[(bg_weight, beta)] = out = step(**b)
    base = losses[(35.0, 10.0)]
    assert (base["loss"] - losses[(0.0, 10.0)]["loss"]).item() == pytest.approx(35.0 * base["bg_loss"].item(), rel=1e-4)
    assert (base["loss"] - losses[(35.0, 0.0)]["loss"]).item() == pytest.approx(10.0 * base["ad_loss"].item(), rel=1e-4)
    assert out["bg_loss"].item() > 0


def test_the_regeneration_weight_ramps_from_the_first_step():
    step = make_step(teacher=None)
    assert step.ramp == 0.0  # before any step of the first epoch
    b = batch()
    torch.manual_seed(1)
    first = step(**b)
    # One step done of a 1-step epoch, ramp over 0.1 x 4 epochs: min(1, 1 / 0.4) = 1 only after the step.
    assert step.ramp == 1.0 and "ad_loss" not in first and "gd_loss" not in first


def test_each_pass_trains_only_its_own_parameters_and_never_the_teacher():
    step = make_step()
    b = batch()
    teacher = {**snapshot(step.teacher), **{f"cvae.{k}": v for k, v in snapshot(step.teacher_cvaes).items()}}
    for name in ("cvae", "net"):
        step.set_pass(name)
        opt = torch.optim.SGD([p for p in step.parameters() if p.requires_grad], lr=0.1)
        cvaes, net = snapshot(step.cvaes), snapshot(step.model)
        adapters = snapshot(step.adapters)
        out = step(**b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        moved_cvae, moved_net = changed(cvaes, snapshot(step.cvaes)), changed(net, snapshot(step.model))
        if name == "cvae":
            assert moved_cvae and not moved_net and not changed(adapters, snapshot(step.adapters))
        else:
            assert moved_net and not moved_cvae
            assert any(k.startswith("attention.") for k in moved_net)  # AD and the heads reach the attention
    after = {**snapshot(step.teacher), **{f"cvae.{k}": v for k, v in snapshot(step.teacher_cvaes).items()}}
    assert not changed(teacher, after)
    assert not any(n.startswith(("teacher", "teacher_cvaes")) for n, _ in step.named_parameters())


def test_a_heterogeneous_pair_meets_through_adapters_on_each_tap():
    step = make_step(student=("tiny3d", 2), teacher=("c3d", 4))
    student, teacher = tap_shapes(step.model, *WINDOW), tap_shapes(step.teacher, *WINDOW)
    assert student != teacher and all(a.needed for a in step.adapters)
    feature = torch.rand(1, *student[1])
    assert step.adapters[1](feature).shape[1:] == teacher[1]
    assert step.attention_adapters[0](torch.rand(1, *student[0][:2])).shape[1:] == teacher[0][:2]
    out = step(**batch())
    assert torch.isfinite(out["align_loss"]) and torch.isfinite(out["ad_loss"])


def test_the_score_kd_step_adds_lambda_times_the_step_averaged_kl():
    student, _ = detector("tiny3d", 2, seed=0, attention=False)
    teacher, _ = detector("c3d", 2, seed=1, attention=False)
    b = batch()
    out = DetectionKDStep(student, teacher, tau=2.0, lam=0.5, reg_weight=1.0)(**b)
    with torch.no_grad():
        s, t = student(b["clip"]), teacher(b["clip"])["logits"]
        steps = s["logits"].shape[1]
        centre = (torch.arange(steps) + 0.5) * s["stride"]
        valid = centre[None] < b["valid_steps"][:, None]
        kd = score_kd_loss(to_steps(t, steps), s["logits"], valid, 2.0)
    assert t.shape[1] != steps  # C3D's middle tap is coarser than tiny3d's: the teacher is resized
    assert out["kd_loss"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((out["cls_loss"] + out["reg_loss"] + 0.5 * kd).item(), rel=1e-5)


def test_the_logged_state_rebuilds_the_detector_and_its_cvaes():
    model, cvaes = detector("c3d", 2, seed=4)
    meta = {"arch": "c3d", "num_classes": 3, "width": 2, "head_channels": 8, "modality": "rgb", "length": WINDOW[0],
            "crop": WINDOW[1], "variant": "faithful", "norm": "values"}
    rebuilt, rebuilt_cvaes = load_detector_state(detector_state(model.eval(), cvaes, meta))
    x = torch.rand(2, 3, WINDOW[0], WINDOW[1], WINDOW[1])
    with torch.no_grad():
        assert torch.equal(rebuilt(x)["logits"], model(x)["logits"])
    assert rebuilt.attention is not None and len(rebuilt_cvaes) == 2
    assert all(torch.equal(a, b) for a, b in zip(rebuilt_cvaes.state_dict().values(), cvaes.state_dict().values()))
    plain, _ = detector("tiny3d", 2, seed=4, attention=False)
    again, none = load_detector_state(detector_state(plain, None, {**meta, "arch": "tiny3d"}))
    assert none is None and again.attention is None


def test_the_attention_keeps_every_step_of_a_window_longer_than_the_trunk_is_wide():
    model, _ = detector("tiny3d", 1)
    (c, t, _, _), _ = tap_shapes(model, *WINDOW)
    head = model.attention.heads[0]
    assert t > c and head.length == t  # L = max(C, T'), so no step is dropped before Linear(L -> T')
    assert head(torch.rand(1, *tap_shapes(model, *WINDOW)[0])).shape == (1, c, t)

