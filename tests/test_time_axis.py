"""The trunk's time axis: `keep_time` leaves out a trunk's last temporal downsamplings, and GKD's CPU
recipe uses it so that the teacher's and the student's last feature keep T' >= 4 (the paper's
channel x time attention has T' = 8; the CPU preset's 8-frame clips leave C3D and the ResNets T' = 1)."""

from __future__ import annotations

import pytest
import torch

from kdhar import config as C
from kdhar.experiments import DatasetSpec, build_run_config, load_spec, plan
from kdhar.models import MODELS, build_model, count_params
from kdhar.models.temporal import time_downsamplings
from kdhar.objectives.gkd import feature_shape

DATA = DatasetSpec(name="ucf101", root="data/synthetic/ucf101")


def cpu_cfg(arch: str, **overrides):
    return build_run_config(arch, size="cpu", overrides=overrides, dataset=DATA, fraction=1.0, seed=0)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_the_gkd_cpu_recipe_keeps_a_time_axis_of_four_or_more_in_every_backbone(arch):
    for cfg in (cpu_cfg(arch, kd="gkd"), cpu_cfg(arch, attention=True)):  # a GKD student, a teacher or its twin
        model = build_model(arch, 10, width=cfg.model.width, keep_time=cfg.model.keep_time)
        c, t, h, w = feature_shape(model, cfg.clip.clip_len, cfg.clip.crop)
        assert cfg.clip.clip_len == 8 and t >= 4, (arch, cfg.model.keep_time, (c, t, h, w))
    assert cpu_cfg(arch).model.keep_time == 0  # without GKD the CPU preset is as published


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_keep_time_changes_strides_only(arch):
    x = torch.randn(1, 3, 8, 32, 32)
    published, kept = build_model(arch, 5, width=4).eval(), build_model(arch, 5, width=4, keep_time=2).eval()
    assert count_params(kept) == count_params(published)
    assert [p.shape for p in kept.parameters()] == [p.shape for p in published.parameters()]
    with torch.no_grad():
        a, b = published.forward_features(x), kept.forward_features(x)
    assert a.shape[3:] == b.shape[3:] and a.shape[1] == b.shape[1]  # space and channels as published
    halvings = time_downsamplings(published.backbone)
    assert b.shape[2] == 8 // 2 ** max(0, halvings - 2)
    assert time_downsamplings(kept.backbone) == max(0, halvings - 2)


def test_keep_time_is_a_checked_knob_and_neutral_at_zero():
    with pytest.raises(ValueError, match="keep_time"):
        build_model("c3d", 5, width=4, keep_time=-1)
    with pytest.raises(Exception, match="keep_time=-1"):
        cpu_cfg("c3d", keep_time=-1)
    assert cpu_cfg("c3d", keep_time=1).model.keep_time == 1
    # (test_models' fixed hashes check that keep_time 0 leaves earlier runs' identities alone)


def test_the_gkd_cpu_grid_keeps_t_four_and_one_modality_for_teachers_and_students():
    cells = plan(load_spec("experiments/gkd-cpu.yaml"))
    shapes = {}
    for cell in cells:
        m = cell.cfg.model
        assert m.modality == "rgb", cell.label()  # the teacher sees the students' RGB frames
        model = build_model(cell.arch, 10, width=m.width, keep_time=m.keep_time)
        shapes[cell.label()] = feature_shape(model, cell.cfg.clip.clip_len, cell.cfg.clip.crop)
        assert shapes[cell.label()][1] >= 4, (cell.label(), shapes[cell.label()])
    assert C.GKD_RECIPE["cpu"]["model"]["keep_time"] == 2
