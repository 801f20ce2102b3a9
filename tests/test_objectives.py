import math

import pytest
import torch
import torch.nn.functional as F

from kdhar.models import build_model
from kdhar.objectives import KDStep, SupervisedStep, balance_scale, is_stuck, kd_term, uniform_kd_term


class FixedLogits(torch.nn.Module):
    """A 'network' whose logits are a trainable table indexed by the first pixel of each clip."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0, 0].long()]


def hand_kd(student: list[list[float]], teacher: list[list[float]], tau: float) -> float:
    """tau^2 * mean over the batch of sum_c p_c (log p_c - log q_c), softmax written out by hand."""

    def softmax(row):
        exps = [math.exp(v / tau) for v in row]
        return [e / sum(exps) for e in exps]

    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p, q = softmax(t_row), softmax(s_row)
        total += sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q))
    return tau * tau * total / len(student)


def index_clips(n: int) -> torch.Tensor:
    x = torch.zeros(n, 3, 1, 1, 1)
    x[:, 0, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return x


STUDENT = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
TEACHER = torch.tensor([[1.0, 0.0, -1.0], [0.5, -0.5, 4.0], [3.0, 0.0, -3.0], [1.0, 2.0, 3.0]])
LABELS = torch.tensor([0, 2, 1, 2])


@pytest.mark.parametrize("tau,lam", [(1.0, 1.0), (4.0, 0.5), (2.5, 3.0)])
def test_kd_loss_matches_hand_formula(tau, lam):
    step = KDStep(FixedLogits(STUDENT), FixedLogits(TEACHER), tau=tau, lam=lam)
    out = step(index_clips(4), LABELS)
    expected_kd = hand_kd(STUDENT.tolist(), TEACHER.tolist(), tau)
    expected_ce = -sum(
        math.log(math.exp(row[y]) / sum(math.exp(v) for v in row)) for row, y in zip(STUDENT.tolist(), LABELS.tolist())
    ) / 4
    assert out["kd_loss"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert out["task_loss"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected_ce + lam * expected_kd, rel=1e-5)
    torch.testing.assert_close(out["output"], STUDENT)


def test_lambda_zero_equals_plain_cross_entropy():
    x = index_clips(4)
    kd = KDStep(FixedLogits(STUDENT), FixedLogits(TEACHER), tau=4.0, lam=0.0)(x, LABELS)
    plain = SupervisedStep(FixedLogits(STUDENT))(x, LABELS)
    assert kd["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)
    assert kd["kd_loss"].item() > 0


def test_identical_logits_give_zero_kd_term():
    out = KDStep(FixedLogits(STUDENT), FixedLogits(STUDENT), tau=4.0, lam=1.0)(index_clips(4), LABELS)
    assert out["kd_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["task_loss"].item(), rel=1e-6)


def test_teacher_is_frozen_and_outside_the_step():
    student = build_model("tiny3d", num_classes=4, width=4)
    teacher = build_model("c3d", num_classes=4, width=4)
    step = KDStep(student, teacher, tau=4.0, lam=1.0)
    step_params = {id(p) for p in step.parameters()}
    assert step_params == {id(p) for p in student.parameters()}
    assert not any(id(p) in step_params for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in step.state_dict())

    step.train()
    assert step.student.training and not teacher.training
    before = [p.clone() for p in teacher.parameters()]
    x, y = torch.randn(2, 3, 4, 16, 16), torch.tensor([0, 3])
    step(x, y)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # In eval mode the teacher's BatchNorm running statistics are not updated either.
    for b, p in zip(before, teacher.parameters()):
        torch.testing.assert_close(b, p)
    assert int(teacher.backbone.layers[0][1].num_batches_tracked) == 0


def test_to_moves_the_unregistered_teacher():
    teacher = build_model("tiny3d", num_classes=4, width=4)
    KDStep(build_model("tiny3d", num_classes=4, width=4), teacher).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in teacher.parameters())


def test_cached_logits_give_the_same_loss_as_the_live_teacher():
    torch.manual_seed(0)
    student = build_model("tiny3d", num_classes=5, width=4, dropout=0.0)
    teacher = build_model("c3d", num_classes=5, width=4)
    step = KDStep(student, teacher, tau=3.0, lam=0.7).eval()
    x, y = torch.randn(3, 3, 4, 16, 16), torch.tensor([0, 4, 2])
    with torch.no_grad():
        cached = teacher(x)
    live = step(x, y)
    from_cache = step(x, y, teacher_logits=cached)
    torch.testing.assert_close(live["loss"], from_cache["loss"])
    torch.testing.assert_close(live["kd_loss"], from_cache["kd_loss"])
    assert live["kd_loss"].item() > 0


def test_cached_logits_of_the_wrong_width_are_rejected():
    step = KDStep(FixedLogits(STUDENT), FixedLogits(TEACHER))
    with pytest.raises(ValueError, match="same classes"):
        step(index_clips(4), LABELS, teacher_logits=torch.zeros(4, 5))


@pytest.mark.parametrize("tau,lam,match", [(0.0, 1.0, "tau"), (-1.0, 1.0, "tau"), (4.0, -0.1, "lam")])
def test_bad_tau_or_lambda_raises(tau, lam, match):
    with pytest.raises(ValueError, match=match):
        KDStep(FixedLogits(STUDENT), FixedLogits(TEACHER), tau=tau, lam=lam)


def test_supervised_step_is_cross_entropy():
    out = SupervisedStep(FixedLogits(STUDENT))(index_clips(4), LABELS)
    torch.testing.assert_close(out["loss"], F.cross_entropy(STUDENT, LABELS))
    assert set(out) == {"loss", "output", "task_loss"}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mix_weighting_is_a_convex_combination(alpha):
    step = KDStep(FixedLogits(STUDENT), FixedLogits(TEACHER), tau=4.0, weighting="mix", alpha=alpha)
    out = step(index_clips(4), LABELS)
    expected = (1 - alpha) * out["task_loss"].item() + alpha * hand_kd(STUDENT.tolist(), TEACHER.tolist(), 4.0)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [({"weighting": "mix", "alpha": 1.5}, "alpha"), ({"weighting": "mix", "alpha": -0.1}, "alpha"),
     ({"weighting": "avg"}, "weighting"), ({"tau": float("nan")}, "tau")],
)
def test_bad_weighting_or_alpha_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        KDStep(FixedLogits(STUDENT), FixedLogits(TEACHER), **kw)


def test_mix_halves_the_step_of_sum_at_alpha_one_half():
    # The point of "mix": the same tau and teacher, but a total gradient about CE's size, not CE's plus the
    # soft term's. With alpha 0.5 every gradient is exactly half of "sum" at lam 1.
    grads = {}
    for weighting in ("sum", "mix"):
        student = FixedLogits(STUDENT)
        KDStep(student, FixedLogits(TEACHER), tau=4.0, weighting=weighting, alpha=0.5, lam=1.0)(index_clips(4), LABELS)["loss"].backward()
        grads[weighting] = student.logits.grad
    torch.testing.assert_close(grads["mix"], grads["sum"] / 2)


def logit_grad(loss_of, logits: torch.Tensor) -> torch.Tensor:
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(z), z)
    return grad


def test_balanced_soft_gradient_at_the_logits_matches_cross_entropys():
    # By autograd, not by balance_scale's own closed form: s * tau^2 * KL has CE's gradient norm.
    s = balance_scale(STUDENT, TEACHER, LABELS, 4.0)
    assert 1 / 16 < s.item() < 1  # inside the clamp, so the balance is exact
    g_ce = logit_grad(lambda z: F.cross_entropy(z, LABELS), STUDENT)
    g_soft = logit_grad(lambda z: s * kd_term(z, TEACHER, 4.0), STUDENT)
    assert g_soft.norm().item() == pytest.approx(g_ce.norm().item(), rel=1e-5)
    # At alpha 0.5 the whole loss's gradient is then half of CE's plus half of an equal-sized term:
    # never more than CE's, where mix at alpha 0.5 would add half of the raw soft term's.
    step = KDStep(FixedLogits(STUDENT), FixedLogits(TEACHER), tau=4.0, weighting="balanced", alpha=0.5)
    out = step(index_clips(4), LABELS)
    out["loss"].backward()
    assert step.student.logits.grad.norm().item() <= g_ce.norm().item() * (1 + 1e-6)
    assert out["kd_balanced_loss"].item() == pytest.approx(s.item() * out["kd_loss"].item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * out["task_loss"].item() + 0.5 * out["kd_balanced_loss"].item(), rel=1e-6)


def test_balanced_scale_stays_between_plain_kl_and_hintons_term():
    teacher_like = TEACHER * 1.0
    # A student that matches its teacher's soft targets: no soft gradient, the scale stops at 1.
    assert balance_scale(teacher_like, TEACHER, LABELS, 4.0).item() == 1.0
    # A student that fits its labels almost exactly (CE's gradient near 0): the scale stops at 1/tau^2.
    certain = F.one_hot(LABELS, 3).float() * 50
    assert balance_scale(certain, TEACHER, LABELS, 4.0).item() == pytest.approx(1 / 16)
    # Below tau 1 the bounds swap places (1/tau^2 > 1).
    assert balance_scale(certain, TEACHER, LABELS, 0.5).item() == pytest.approx(1.0)
    # The scale carries no gradient: it reweighs the soft term, it is not trained on.
    z = STUDENT.clone().requires_grad_(True)
    assert not balance_scale(z, TEACHER, LABELS, 4.0).requires_grad


def test_stuck_is_chance_accuracy_after_half_the_epochs_whatever_the_loss_did():
    # 10 classes: chance 0.10, the limit 1.5x chance = 0.15; judged from the 50th step on.
    assert is_stuck(train_acc=0.15, num_classes=10, share_done=0.5, steps_done=50)  # every edge counts
    assert not is_stuck(train_acc=0.10, num_classes=10, share_done=1.0, steps_done=49)  # too short to judge
    # The soft loss fell far below a uniform student's: still stuck.
    assert is_stuck(train_acc=0.10, num_classes=10, share_done=1.0, steps_done=200, soft=0.2, uniform=2.0)
    assert not is_stuck(train_acc=0.16, num_classes=10, share_done=1.0, steps_done=200, soft=3.0, uniform=2.0)
    assert not is_stuck(train_acc=0.10, num_classes=10, share_done=0.4, steps_done=200)  # a slow start
    # Before half the epochs, a distilled run is stuck when its soft loss is no lower than a uniform student's.
    assert is_stuck(train_acc=0.10, num_classes=10, share_done=0.25, steps_done=200, soft=2.0, uniform=2.0)
    assert not is_stuck(train_acc=0.10, num_classes=10, share_done=0.25, steps_done=200, soft=1.9, uniform=2.0)
    assert not is_stuck(train_acc=0.20, num_classes=10, share_done=0.25, steps_done=200, soft=2.5, uniform=2.0)
    assert not is_stuck(train_acc=0.10, num_classes=10, share_done=0.25, steps_done=40, soft=2.5, uniform=2.0)


def test_uniform_student_soft_loss_by_hand():
    # tau 2, teacher logits (2 ln 3, 0) -> softened p = (3/4, 1/4); against the uniform (1/2, 1/2):
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812; times tau^2 = 4: 0.523248.
    # Second clip: teacher logits equal -> p uniform -> 0. Batch mean: 0.261624.
    teacher = torch.tensor([[2 * math.log(3), 0.0], [5.0, 5.0]])
    assert uniform_kd_term(teacher, tau=2.0).item() == pytest.approx(0.261624, abs=1e-6)
    # It is kd_term of a student whose logits are all equal, whatever their value.
    assert uniform_kd_term(teacher, 2.0).item() == pytest.approx(kd_term(torch.full((2, 2), 7.0), teacher, 2.0).item())
    # A KD step reports it beside its soft loss, for the batch's teacher logits.
    out = KDStep(FixedLogits(STUDENT), FixedLogits(TEACHER), tau=4.0)(index_clips(4), LABELS)
    assert out["kd_uniform_loss"].item() == pytest.approx(uniform_kd_term(TEACHER[:4], 4.0).item())


def test_factory_builds_supervised_without_a_teacher_and_logs_only_acting_knobs():
    from kdhar.config import KDConfig, RunConfig
    from kdhar.objectives import Teacher, build_objective

    cfg = RunConfig(kd=KDConfig(weighting="mix", alpha=0.3))
    plain = build_objective(cfg)
    assert plain.name == "supervised" and plain.params == {} and plain.soft_term is None
    assert isinstance(plain.make_step(FixedLogits(STUDENT), 1), SupervisedStep)
    teacher = Teacher(model=FixedLogits(TEACHER), uri="runs:/abc/model", classes=["a", "b", "c"], arch="c3d", run_id="abc")
    kd = build_objective(cfg, teacher)
    assert kd.params == {"kd.tau": 4.0, "kd.weighting": "mix", "kd.alpha": 0.3}  # no kd.lam: it does not act
    assert kd.tags["teacher_run_id"] == "abc" and kd.soft_term == "kd_loss"
    assert build_objective(RunConfig(kd=KDConfig(weighting="sum")), teacher).params["kd.lam"] == 1.0
    assert build_objective(RunConfig(kd=KDConfig(weighting="balanced", alpha=0.4)), teacher).params == {
        "kd.tau": 4.0, "kd.weighting": "balanced", "kd.alpha": 0.4}
    with pytest.raises(ValueError, match="--views 4"):
        build_objective(cfg, teacher, cache_teacher=True)  # a cache without replayed views
