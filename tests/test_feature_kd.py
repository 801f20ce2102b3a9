"""The baselines a GKD researcher compares against: feature KD (`--kd feature`, the FitNets-style hint
loss on the adapted last feature) and GKD's ablations (`--gkd-ablation ad-only|gd-only|no-rec`), each
checked term by term, through the factory, and (feature KD) in a real run from a logged teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdhar.config import GKDConfig
from kdhar.experiments import DatasetSpec, SpecError, build_run_config
from kdhar.methods import REGISTRY_LABELS, REPORT_MARKS
from kdhar.models import build_model
from kdhar.objectives import build_objective
from kdhar.objectives.factory import Teacher
from kdhar.objectives.feature import FeatureKDStep
from kdhar.objectives.gkd import GKDStep, build_gkd_net

CLIP = (8, 56)
DATA = DatasetSpec(name="ucf101", root="data/synthetic/ucf101")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(b: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, CLIP[0], CLIP[1], CLIP[1], generator=g), torch.tensor([1, 7, 3, 0][:b])


def models(student=("tiny3d", 4), teacher=("c3d", 8)):
    torch.manual_seed(0)
    s = build_model(student[0], 10, width=student[1], dropout=0.0)
    torch.manual_seed(1)
    return s, build_model(teacher[0], 10, width=teacher[1])


def test_feature_kd_is_ce_plus_the_weighted_hint_between_the_regressed_student_feature_and_the_teachers():
    student, teacher = models()
    step = FeatureKDStep(student, teacher, weight=0.7, clip=CLIP).eval()
    x, y = batch()
    out = step(x, y)
    with torch.no_grad():
        feature = student.forward_features(x)
        target = teacher.forward_features(x)
        regressed = step.regressor(feature)
    assert regressed.shape == target.shape == (2, 64, 1, 4, 4)  # tiny3d (16, 2, 7, 7) at width 4 mapped onto C3D's
    assert step.regressor.describe() == "1x1x1 conv 16->64, resize 2x7x7->1x4x4"
    assert out["task_loss"].item() == pytest.approx(F.cross_entropy(student(x), y).item(), rel=1e-5)
    assert out["hint_loss"].item() == pytest.approx(F.mse_loss(regressed, target).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((out["task_loss"] + 0.7 * out["hint_loss"]).item(), rel=1e-6)
    # The teacher is frozen and unregistered; the regressor trains with the student.
    names = {n for n, _ in step.named_parameters()}
    assert any(n.startswith("regressor.") for n in names) and not any("teacher" in n for n in names)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    step.train()
    assert not teacher.training


def test_the_hint_pulls_the_students_trunk():
    """Unlike GKD's feature adapter (which regresses a detached feature), the hint's gradient reaches
    the trunk: with the labels' gradient taken away, the trunk still moves."""
    student, teacher = models()
    step = FeatureKDStep(student, teacher, weight=1.0, clip=CLIP).train()
    x, y = batch()
    step(x, y)["hint_loss"].backward()
    first_conv = next(p for n, p in student.named_parameters() if n.startswith("backbone."))
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.head.parameters())  # the hint does not reach the classifier


def cpu_cfg(**overrides):
    return build_run_config("tiny3d", size="cpu", overrides={"width": 4, **overrides}, dataset=DATA, fraction=1.0,
                            seed=0)


def test_the_factory_builds_feature_kd_from_a_teacher_with_a_trunk_and_its_knobs_are_logged_where_they_act():
    cfg = cpu_cfg(kd="feature", feature_weight=0.5)
    student, teacher = models()
    objective = build_objective(cfg, Teacher(model=teacher, uri="ckpt.pt", classes=[], arch="c3d"))
    step = objective.make_step(student, 16)
    assert isinstance(step, FeatureKDStep) and step.weight == 0.5
    assert objective.name == "kd-feature" and objective.tags["method"] == "kd-feature"
    assert objective.registry_label == REGISTRY_LABELS["kd-feature"] == "feature-kd"
    assert REPORT_MARKS["kd-feature"] == "feature" and objective.terms == ("task_loss", "hint_loss")
    assert objective.params == {"feature.weight": 0.5, "feature.adapter": "1x1x1 conv 16->64, resize 2x7x7->1x4x4"}
    distilled = cfg.params(kd=True)
    assert distilled["feature.weight"] == 0.5 and not any(k.startswith(("kd.", "gkd.")) for k in distilled)
    assert cfg.params(kd=False) == cpu_cfg().params(kd=False)  # its scratch twin is plain scratch
    assert build_objective(cfg).name == "supervised"  # --teacher none --kd feature
    with pytest.raises(SpecError, match="attention"):
        cpu_cfg(kd="feature", attention=True)
    with pytest.raises(SpecError, match="feature_weight"):
        cpu_cfg(kd="feature", feature_weight=-1.0)


# ---------------------------------------------------------------- GKD's ablations


def gkd_step(ablation: str) -> GKDStep:
    torch.manual_seed(0)
    net, cvae = build_gkd_net(build_model("tiny3d", 10, width=4), *CLIP, "faithful", "sample")
    torch.manual_seed(1)
    parts = build_gkd_net(build_model("c3d", 10, width=8), *CLIP, "faithful", "sample")
    cfg = GKDConfig(method="gkd", attention=True, beta=0.3, gd_weight=0.05, rec_weight=0.7, ablation=ablation)
    return GKDStep(net, cvae, cfg, 10, CLIP, *parts).eval()


@pytest.mark.parametrize("ablation,off", [("none", None), ("ad-only", "gd"), ("gd-only", "ad"), ("no-rec", "rec")])
def test_each_ablation_turns_its_own_term_off_and_keeps_the_others(ablation, off):
    step = gkd_step(ablation)
    step.set_epoch(9)  # ramp at full weight
    x, y = batch()
    step.set_pass("net")
    torch.manual_seed(3)
    net = step(x, y)
    beta = 0.0 if off == "ad" else 0.3
    rec = 0.0 if off == "rec" else 0.7
    want = net["task_loss"] + beta * net["ad_loss"] + net["align_loss"] + rec * net["rec_loss"]
    assert net["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert net["ad_loss"].item() > 0 and net["rec_loss"].item() > 0  # still measured, only not trained on
    step.set_pass("cvae")
    torch.manual_seed(3)
    cvae = step(x, y)
    gd = 0.0 if off == "gd" else 0.05
    want = cvae["recon_loss"] + 0.1 * cvae["kl_loss"] + gd * cvae["gd_loss"]
    assert cvae["loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_an_ablation_is_a_logged_setting_of_gkd_runs_only():
    cfg = cpu_cfg(kd="gkd", gkd_ablation="gd-only")
    assert cfg.params(kd=True)["gkd.ablation"] == "gd-only" and cfg.gkd.weights()["beta"] == 0.0
    assert "gkd.ablation" not in cpu_cfg(kd="gkd").params(kd=True)  # earlier runs keep their identity
    with pytest.raises(SpecError, match="gkd_ablation"):
        cpu_cfg(gkd_ablation="no-rec")  # logit KD has no GKD term to turn off
    with pytest.raises(SpecError, match="gkd_ablation"):
        cpu_cfg(kd="gkd", gkd_ablation="no-ad")


# ---------------------------------------------------------------- a real run


@pytest.mark.slow
def test_feature_kd_reads_a_logged_teachers_rebuilt_trunk(local_tracking):
    """A logged teacher is an exported graph with logits only: feature KD rebuilds its trunk from the
    run's configuration (architecture, width, keep_time) and gives it the graph's weights."""
    import numpy as np

    from kdhar import tracking
    from kdhar.objectives.factory import load_feature_teacher

    torch.manual_seed(0)
    model = build_model("c3d", 3, width=4, keep_time=2).eval()
    with tracking.RunTracker("fkd", run_name="teacher") as tracker:
        tracker.log_dict({"model.width": 4, "model.modality": "rgb", "model.keep_time": 2}, "config.json")
        uri = tracker.log_model(model, "teacher", input_example=np.zeros((2, 3, *CLIP[:1], CLIP[1], CLIP[1]),
                                                                           dtype=np.float32)).model_uri
        run_id = tracker.run_id
    logged = tracking.load_model(uri, "cpu")
    assert not hasattr(logged, "forward_features")
    trunk = load_feature_teacher(Teacher(model=logged, uri=uri, classes=["a", "b", "c"], arch="c3d", run_id=run_id))
    clips = torch.rand(2, 3, CLIP[0], CLIP[1], CLIP[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(trunk(clips), logged(clips), atol=1e-5)  # the same network, now with its trunk
        assert torch.allclose(trunk.forward_features(clips), model.forward_features(clips), atol=1e-5)
        assert trunk.forward_features(clips).shape == (2, 32, 4, 4, 4)  # keep_time 2: T' = 4 of 8 frames
    with pytest.raises(ValueError, match="runs:/<run id>"):
        load_feature_teacher(Teacher(model=logged, uri="somewhere", classes=["a"], arch=None, run_id=None))
