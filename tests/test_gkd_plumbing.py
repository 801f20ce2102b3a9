"""GKD through the layers that know methods by name only: the run's configuration and params, the
grid's cells, the tuner's search space and the report's rows."""

from __future__ import annotations

import pytest

from kdhar import config as C
from kdhar.experiments import DatasetSpec, SpecError, build_run_config, parse_spec, plan
from kdhar.report import aggregate, format_table
from kdhar.tuning import SearchSpace, study_config, trial_config

DATA = DatasetSpec(name="ucf101", root="data/synthetic/ucf101")


def cfg(**overrides):
    return build_run_config("c3d", size="cpu", overrides=overrides, dataset=DATA, fraction=1.0, seed=0)


def test_gkd_knobs_are_logged_only_where_they_act():
    plain, gkd, scratch_att = cfg(), cfg(kd="gkd"), cfg(attention=True)
    assert not any(k.startswith("gkd.") for k in plain.params(kd=True))
    assert gkd.gkd.attention and gkd.gkd.cvae_lr == 1e-3  # the CPU preset's CVAE lr
    distilled = gkd.params(kd=True)
    assert distilled["gkd.method"] == "gkd" and distilled["gkd.beta"] == 0.1 and distilled["gkd.gd_weight"] == 0.01
    assert not any(k.startswith("kd.") for k in distilled)  # GKD alone has no temperature or alpha
    assert any(k.startswith("kd.") for k in cfg(kd="gkd+logit").params(kd=True))
    # The scratch + attention twin shares every knob but the distillation ones (its pair key).
    assert scratch_att.params(kd=False) == gkd.params(kd=False)
    assert "gkd.beta" not in scratch_att.params(kd=False)


def test_gkd_paper_preset_and_bad_values():
    paper = build_run_config("c3d", size="paper", overrides={"kd": "gkd"}, dataset=DATA, fraction=1.0, seed=0)
    assert (paper.optim.lr, paper.optim.schedule, paper.optim.warmup, paper.optim.batch_size) == (1e-3, "constant", 0.0, 6)
    assert paper.gkd.cvae_lr == 1e-4
    with pytest.raises(SpecError, match="gkd_ramp"):
        cfg(kd="gkd", gkd_ramp=0.0)
    with pytest.raises(SpecError, match="gkd_variant"):
        cfg(kd="gkd", gkd_variant="huge")
    with pytest.raises(SpecError, match="attention"):
        cfg(kd="gkd", attention=False)
    with pytest.raises(SpecError, match="ssl"):
        cfg(kd="gkd", ssl="pcl")


def spec(**extra):
    raw = {"experiment": "g", "dataset": {"name": "ucf101", "root": "data/synthetic/ucf101"}, "teachers": ["c3d"],
           "students": ["c3d", "tiny3d"], "self_distill": True, "fractions": [1.0], "seeds": [0, 1], **extra}
    return parse_spec(raw)


def test_a_grid_with_gkd_trains_attention_teachers_and_a_scratch_attention_twin():
    cells = plan(spec(kd=["logit", "gkd", "gkd+logit"]))
    teacher = [c for c in cells if c.role == "teacher"]
    assert len(teacher) == 1 and teacher[0].cfg.gkd.attention and teacher[0].cfg.gkd.ramp == 1.0
    students = [c for c in cells if c.role == "student"]
    by_kind = {}
    for c in students:
        kind = ("scratch" if c.teacher == "none" else "kd", c.cfg.gkd.attention, c.cfg.gkd.method)
        by_kind[kind] = by_kind.get(kind, 0) + 1
    # 2 students x 2 seeds each: scratch, scratch + attention, logit, gkd, gkd+logit
    assert by_kind == {("scratch", False, "logit"): 4, ("scratch", True, "logit"): 4, ("kd", False, "logit"): 4,
                       ("kd", True, "gkd"): 4, ("kd", True, "gkd+logit"): 4}
    assert "[gkd+logit]" in next(c for c in students if c.cfg.gkd.method == "gkd+logit").label()
    assert not any(c.cfg.gkd.attention for c in plan(spec()) )  # a logit-only grid is as before


def test_spec_refuses_unknown_methods_and_kd_in_overrides():
    with pytest.raises(SpecError, match="kd:"):
        spec(kd=["gkd", "fitnets"])
    with pytest.raises(SpecError, match="top of the spec"):
        spec(overrides={"kd": "gkd"})


def test_tuning_space_follows_the_kd_method():
    assert SearchSpace.default("mix", "logit").beta is None
    gkd = SearchSpace.default("mix", "gkd")
    assert gkd.names() == ["lr", "beta", "ramp"]
    both = SearchSpace.default("mix", "gkd+logit")
    assert both.names() == ["tau", "alpha", "lr", "beta", "ramp"]
    with pytest.raises(ValueError, match="does not act under --kd gkd"):
        SearchSpace.parse("tau=1:4", "mix", "gkd")
    with pytest.raises(ValueError, match="does not act under --kd logit"):
        SearchSpace.parse("beta=0.1:1", "mix", "logit")
    with pytest.raises(ValueError, match="share of the epochs"):
        SearchSpace.parse("ramp=0:2", "mix", "gkd")
    tried = trial_config(cfg(kd="gkd"), {"beta": 0.5, "ramp": 0.3, "lr": 0.01})
    assert (tried.gkd.beta, tried.gkd.ramp, tried.optim.lr) == (0.5, 0.3, 0.01)
    shared = study_config(cfg(kd="gkd"), gkd, "c3d", "fp")
    assert "gkd.beta" not in shared and "gkd.ramp" not in shared and shared["gkd.variant"] == "faithful"

    weights = SearchSpace.parse("rec_weight=0.05:1:log,gd_weight=0.001:0.1:log", "mix", "gkd")
    assert weights.names() == ["lr", "beta", "ramp", "rec_weight", "gd_weight"]
    with pytest.raises(ValueError, match="does not act under --kd logit"):
        SearchSpace.parse("rec_weight=0.1:1", "mix", "logit")
    tried = trial_config(cfg(kd="gkd"), {"rec_weight": 0.2, "gd_weight": 0.05})
    assert (tried.gkd.rec_weight, tried.gkd.gd_weight) == (0.2, 0.05)
    shared = study_config(cfg(kd="gkd"), weights, "c3d", "fp")
    assert "gkd.rec_weight" not in shared and "gkd.gd_weight" not in shared


def run(run_id, teacher, seed, final, method):
    tags = {"role": "student", "student_arch": "c3d", "arch": "c3d", "teacher_arch": teacher, "fraction": "1.0",
            "seed": str(seed), "dataset": "ucf101", "method": method}
    return {"run_id": run_id, "tags": tags, "metrics": {"final_test_video_top1": final}, "params": {}, "status": "FINISHED"}


def test_report_has_a_row_per_method_each_compared_with_plain_scratch():
    runs = [run("s0", "none", 0, 0.50, "supervised"), run("s1", "none", 1, 0.60, "supervised"),
            run("a0", "none", 0, 0.55, "attention"), run("a1", "none", 1, 0.61, "attention"),
            run("k0", "c3d", 0, 0.70, "kd-logit"), run("k1", "c3d", 1, 0.72, "kd-logit"),
            run("g0", "c3d", 0, 0.65, "gkd"), run("g1", "c3d", 1, 0.69, "gkd"),
            run("b0", "c3d", 0, 0.75, "gkd+kd-logit"), run("b1", "c3d", 1, 0.77, "gkd+kd-logit")]
    rows = {r.teacher: r for r in aggregate(runs)}
    assert set(rows) == {"none", "none [attention]", "c3d", "c3d [gkd]", "c3d [gkd+logit]"}
    assert rows["c3d [gkd]"].delta["final"] == pytest.approx(0.67 - 0.55)
    assert rows["none [attention]"].delta["final"] == pytest.approx(0.58 - 0.55)
    assert rows["c3d [gkd+logit]"].tests["last"].mean == pytest.approx(0.21)
    text = format_table(list(rows.values()))
    assert "scratch + attention" in text and "c3d [gkd+logit]" in text
