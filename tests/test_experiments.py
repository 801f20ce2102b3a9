"""Experiment specs and grid plans, and one real tiny grid run end to end (train, resume, report)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdhar.experiments import SpecError, build_run_config, cell_hash, grid_status, load_spec, parse_spec, plan
from tests.conftest import SEVERAL_PROCESSES

REPO = Path(__file__).resolve().parents[1]


def minimal(**changes):
    raw = {
        "experiment": "e",
        "dataset": {"name": "ucf101", "root": "data/x"},
        "teachers": ["c3d", "r3d_18"],
        "students": ["c3d", "r3d_18", "tiny3d"],
        "fractions": [1.0, 0.25],
        "seeds": [0, 1],
    }
    raw.update(changes)
    return raw


def test_plan_orders_teachers_scratch_kd_finetune_and_skips_self_distillation():
    spec = parse_spec(minimal(finetune=True, transfer={"name": "hmdb51", "root": "data/h", "fraction": 0.5}))
    cells = plan(spec)
    waves = [c.wave for c in cells]
    assert waves == sorted(waves, key=["teacher", "scratch", "kd", "finetune"].index)
    assert [c.arch for c in cells if c.role == "teacher"] == ["c3d", "r3d_18"]
    # 3 students x 2 fractions x 2 seeds scratch; KD pairs: c3d<-r3d_18, r3d_18<-c3d, tiny3d<-both
    assert waves.count("scratch") == 12
    kd = [(c.arch, c.teacher) for c in cells if c.wave == "kd"]
    assert sorted(set(kd)) == [("c3d", "r3d_18"), ("r3d_18", "c3d"), ("tiny3d", "c3d"), ("tiny3d", "r3d_18")]
    assert len(kd) == 4 * 2 * 2
    fts = [c for c in cells if c.role == "finetune"]
    assert len(fts) == 12 + 16
    assert all(c.cfg.data.dataset == "hmdb51" and c.cfg.data.fraction == 0.5 for c in fts)
    assert {(c.source.arch, c.source.teacher, c.source.fraction, c.source.seed) for c in fts} == {
        (c.arch, c.teacher, c.fraction, c.seed) for c in cells if c.role == "student"}
    assert all(c.cfg.data.fraction == 1.0 and c.seed == 0 for c in cells if c.role == "teacher")


@pytest.mark.parametrize(
    "changes,match",
    [({"self_distill": "false"}, "self_distill: 'false' is not a boolean"),
     ({"cache_teacher": "yes"}, "cache_teacher"),
     ({"tau": float("nan")}, "tau: nan is not a finite number"),
     ({"weighting": "avg"}, "weighting"),
     ({"alpha": 2.0}, "alpha"),
     ({"cache_teacher": True}, "views: 4")],
)
def test_spec_values_are_checked_before_any_cell(changes, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(minimal(**changes))


def test_self_distill_adds_same_architecture_pairs():
    cells = plan(parse_spec(minimal(self_distill=True, teachers=["c3d"], students=["c3d"], seeds=[0], fractions=[1])))
    assert [(c.role, c.teacher) for c in cells] == [("teacher", "none"), ("student", "none"), ("student", "c3d")]


def test_teacher_recipes_and_seeds_give_one_kd_cell_per_teacher_run():
    # One architecture teaching from RGB and from residual frames, each trained with two seeds.
    spec = parse_spec(minimal(teachers=["c3d", {"arch": "c3d", "name": "c3d-res", "modality": "res", "epochs": 4}],
                              teacher_overrides={"epochs": 3}, teacher_seeds=[0, 1], students=["tiny3d"],
                              fractions=[0.5], seeds=[0, 1, 2]))
    cells = plan(spec)
    teachers = [(c.teacher_id, c.seed, c.cfg.model.modality, c.cfg.optim.epochs) for c in cells if c.role == "teacher"]
    assert teachers == [("c3d-s0", 0, "rgb", 3), ("c3d-s1", 1, "rgb", 3), ("c3d-res-s0", 0, "res", 4),
                        ("c3d-res-s1", 1, "res", 4)]
    kd = [c for c in cells if c.wave == "kd"]
    assert len(kd) == 4 * 3 and {c.teacher for c in kd} == {t[0] for t in teachers}
    assert all(c.cfg.model.modality == "rgb" for c in cells if c.role == "student")  # students see RGB frames
    assert [c.label() for c in cells[:3:2]] == ["teacher c3d-s0 (c3d)", "teacher c3d-res-s0 (c3d)"]
    # One run per architecture (the old form) keeps the architecture as the name, and so its cells' hashes.
    old = plan(parse_spec(minimal(teachers=["c3d"], students=["tiny3d"], seeds=[0], fractions=[1.0])))
    assert [(c.teacher_id, c.teacher) for c in old] == [("c3d", "none"), ("tiny3d", "none"), ("tiny3d", "c3d")]


@pytest.mark.parametrize("changes, message", [
    ({"teachers": ["c3d", "c3d"]}, "c3d given more than once; name each recipe"),
    ({"teachers": [{"name": "x"}]}, "needs an arch"),
    ({"teachers": [{"arch": "c3d", "name": "c3d-res", "crop": 32}]}, "teachers.c3d-res may not set crop"),
    ({"teachers": [{"arch": "c3d", "name": "scratch"}]}, "name 'scratch' must be"),
    ({"teachers": [{"arch": "c3dd"}]}, "unknown architecture c3dd"),
    ({"teacher_seed": 0, "teacher_seeds": [0, 1]}, "teacher_seed or teacher_seeds, not both"),
    ({"teacher_seeds": [1, 1]}, "teacher_seeds: 1 given more than once"),
    ({"tuned": {"r2plus1d_18": "s"}}, "tuned: 'r2plus1d_18' is not one of scratch, kd, c3d, r3d_18"),
    ({"tuned": {"kd": []}}, "tuned.kd: .* must be a study name or a list of them"),
    ({"tuned": 3}, "tuned: 3 must be a study made by `kdhar tune` or a mapping"),
])
def test_teacher_and_tuned_mistakes_name_the_key(changes, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(minimal(**changes))


def test_run_config_applies_preset_then_overrides():
    from kdhar.config import CPU_PRESET

    ds = parse_spec(minimal()).dataset
    cpu = build_run_config("c3d", size="cpu", overrides={"epochs": 3, "crop": 32}, dataset=ds, fraction=0.5, seed=2)
    assert cpu.optim.epochs == 3 and cpu.optim.seed == 2 and cpu.data.fraction == 0.5
    assert cpu.clip.clip_len == CPU_PRESET["clip"]["clip_len"]
    assert cpu.clip.crop == 32 and cpu.clip.resize == (37, 49)  # the CPU preset's 8/7, 4:3 ratio
    paper = build_run_config("c3d", size="paper", overrides={}, dataset=ds, fraction=1.0, seed=0)
    assert (paper.clip.crop, paper.model.width, paper.optim.epochs) == (112, 64, 200)


def test_hash_separates_teachers_and_sources():
    cells = plan(parse_spec(minimal(seeds=[0], fractions=[1.0])))
    kd = [c for c in cells if c.wave == "kd"]
    scratch = next(c for c in cells if c.wave == "scratch" and c.arch == kd[0].arch)
    assert cell_hash(kd[0], teacher_run="a") != cell_hash(kd[0], teacher_run="b")
    assert cell_hash(kd[0], teacher_run="a") != cell_hash(scratch)
    assert cell_hash(scratch) == cell_hash(scratch)
    with pytest.raises(ValueError, match="teacher's run id"):
        cell_hash(kd[0])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teachers": ["c3dd"]}, "unknown architecture c3dd"),
        ({"fractions": [0.0]}, "outside"),
        ({"overrides": {"epoch": 2}}, "unknown override epoch"),
        ({"sizes": "cpu"}, "unknown key sizes"),
        ({"size": "huge"}, "size 'huge'"),
        ({"finetune": True}, "no 'transfer' dataset"),
        ({"dataset": {"name": "ucf101"}}, "'dataset' needs"),
        ({"teacher_overrides": {"crop": 64}}, "teacher_overrides may not set crop"),
        ({"student_overrides": {"r3d_18": {"crop": 64}}}, "student_overrides.r3d_18 may not set crop"),
        ({"student_overrides": {"mc3_18": {"epochs": 2}}}, "mc3_18 is not in students"),
        ({"student_overrides": {"r3d_18": 12}}, "student_overrides: expected a mapping"),
        ({"overrides": {"lr": float("nan")}}, "lr=nan: must be a finite number"),
        ({"teacher_overrides": {"epochs": 0}}, "epochs=0: must be at least 1"),
        # Types are checked before any configuration is built, in every kind of overrides.
        ({"transfer": {"name": "hmdb51", "root": "h"}, "finetune": True, "transfer_overrides": {"epochs": "many"}},
         "epochs='many': must be a whole number"),
        ({"overrides": {"augment": "false"}}, "augment='false': must be true or false"),
        ({"overrides": {"resize": [64]}}, r"resize=\[64\]: must be a list of 2 whole numbers"),
        ({"student_overrides": {"r3d_18": {"lr": "fast"}}}, "lr='fast': must be a number"),
        ({"fractions": 0.5}, r"fractions: expected a non-empty list, e.g. fractions: \[1.0, 0.25\]; got 0.5"),
        ({"seeds": "0"}, "seeds: expected a non-empty list"),
        ({"seeds": [0.5]}, "seeds: 0.5 is not a whole number"),
        ({"seeds": [0, 1, 0]}, "seeds: 0 given more than once"),
        ({"fractions": [0.5, 0.5]}, "fractions: 0.5 given more than once"),
        ({"teacher_seed": 1.7}, "teacher_seed: 1.7 is not a whole number"),
        ({"dataset": {"name": "ucf101", "root": "r", "split": 1.7}}, "dataset.split: 1.7 is not a whole number"),
        ({"dataset": {"name": "ucf101", "root": "r", "split": "2"}}, "dataset.split: '2' is not a whole number"),
        ({"dataset": {"name": "ucf101", "root": "r", "split": 7}}, "dataset.split: 7 is not one of the official splits 1, 2, 3"),
        ({"transfer": {"name": "hmdb51", "root": "h", "split": 0}, "finetune": True}, "transfer.split: 0 is not one of"),
    ],
)
def test_spec_mistakes_name_the_key(change, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(minimal(**change), source="my.yaml")


def test_student_overrides_apply_to_that_students_runs_and_fine_tunes():
    spec = parse_spec(minimal(seeds=[0], fractions=[1.0], overrides={"epochs": 3, "lr": 0.02},
                              student_overrides={"r3d_18": {"epochs": 12, "lr": 0.01, "width": 8}},
                              finetune=True, transfer={"name": "hmdb51", "root": "data/hmdb51"},
                              transfer_overrides={"epochs": 2}))
    cells = plan(spec)
    r3d = [c for c in cells if c.arch == "r3d_18" and c.role == "student"]
    assert {c.teacher for c in r3d} >= {"none"} and len(r3d) >= 2
    assert all((c.cfg.optim.epochs, c.cfg.optim.lr, c.cfg.model.width) == (12, 0.01, 8) for c in r3d)
    others = [c for c in cells if c.arch != "r3d_18" and c.role == "student"]
    assert others and all((c.cfg.optim.epochs, c.cfg.optim.lr) == (3, 0.02) for c in others)
    # A fine-tune loads the student's weights, so it keeps the student's width; epochs are the transfer's.
    ft = [c for c in cells if c.role == "finetune" and c.arch == "r3d_18"]
    assert ft and all((c.cfg.model.width, c.cfg.optim.epochs) == (8, 2) for c in ft)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_spec_that_is_not_yaml_is_one_line_naming_where(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: e\ndataset: {name: ucf101, root: data/x\nteachers: [c3d]\n")
    with pytest.raises(SpecError, match=r"bad.yaml: not valid YAML at line 3, column 9: expected ',' or '}'"):
        load_spec(bad)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00e\x00x")
    with pytest.raises(SpecError, match="not a UTF-8 text file"):
        load_spec(binary)


def test_a_key_given_twice_in_a_spec_is_one_line_naming_where(tmp_path):
    spec = tmp_path / "twice.yaml"
    good = ("experiment: e\ndataset: {name: ucf101, root: data/x}\nteachers: [c3d]\nstudents: [tiny3d]\n"
            "fractions: [1.0]\nseeds: [0]\noverrides: {epochs: 2, lr: 0.1}\n")
    spec.write_text(good + "seeds: [1]\n")
    with pytest.raises(SpecError, match=r"twice.yaml: not valid YAML at line 8, column 1: key 'seeds' is given twice"):
        load_spec(spec)
    spec.write_text(good.replace("lr: 0.1}", "lr: 0.1, epochs: 3}"))
    with pytest.raises(SpecError, match=r"at line 7, column 33: key 'epochs' is given twice"):
        load_spec(spec)
    spec.write_text(good)
    assert load_spec(spec).overrides == {"epochs": 2, "lr": 0.1}


def test_ssl_pcl_trains_the_students_inside_pcl_and_leaves_teachers_and_fine_tunes_supervised():
    spec = parse_spec(minimal(seeds=[0], fractions=[0.25, 0.02], ssl="pcl", overrides={"epochs": 3},
                              fraction_overrides={0.02: {"batch_size": 2}},
                              finetune=True, transfer={"name": "hmdb51", "root": "data/hmdb51"}))
    cells = plan(spec)
    by_role = {role: [c for c in cells if c.role == role] for role in ("teacher", "student", "finetune")}
    assert all(c.cfg.pcl.ssl == "none" for c in by_role["teacher"] + by_role["finetune"])
    students = by_role["student"]
    assert students and all(c.cfg.pcl.ssl == "pcl" and c.cfg.model.modality == "res" for c in students)
    # The CPU preset for PCL: consecutive frames, tuples 2 apart, 3 test clips.
    assert all((c.cfg.clip.frame_interval, c.cfg.pcl.interval, c.cfg.clip.test_clips) == (1, 2, 3) for c in students)
    assert {(c.fraction, c.cfg.optim.batch_size) for c in students} == {(0.25, 16), (0.02, 2)}
    assert "(pcl)" in students[0].label()
    # A PCL student and a supervised one of the same settings are different runs.
    plain = plan(parse_spec(minimal(seeds=[0], fractions=[0.25], overrides={"epochs": 3})))
    assert cell_hash(students[0]) != cell_hash(next(c for c in plain if c.role == "student" and c.teacher == "none"))


def test_pcl_at_the_papers_size_takes_table_1():
    from kdhar.experiments import DatasetSpec

    cfg = build_run_config("r3d_18", size="paper", overrides={"ssl": "pcl"}, dataset=DatasetSpec("ucf101", "x"),
                           fraction=1.0, seed=0)
    assert (cfg.clip.clip_len, cfg.clip.crop, cfg.clip.frame_interval, cfg.clip.test_clips) == (10, 112, 1, 10)
    assert (cfg.pcl.interval, cfg.clip.tuple_len, cfg.pcl.negatives, cfg.pcl.temperature) == (8, 3, 1024, 0.07)
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.schedule) == (0.01, 16, 200, "plateau")
    assert cfg.model.modality == "res" and cfg.optim.warmup == 0.0


@pytest.mark.parametrize("size", ["cpu", "paper"])
def test_pcl_runs_take_the_pcl_codes_protocol_by_default(size):
    from kdhar.experiments import DatasetSpec

    def cfg(**overrides):
        return build_run_config("r3d_10", size=size, overrides=overrides, dataset=DatasetSpec("ucf101", "x"),
                                fraction=0.25, seed=0)

    pcl = cfg(ssl="pcl")
    # Every training video trains (the self-supervised validation loss selects), ImageNet
    # normalisation, no warm-up, upstream's plateau threshold and retrieval pooling, fp32 logits.
    assert (pcl.data.val_fraction, pcl.clip.normalize, pcl.optim.warmup) == (0.0, "imagenet", 0.0)
    assert (pcl.optim.plateau_threshold, pcl.pcl.retrieval_pool, pcl.pcl.fp32_logits) == (1e-4, "floor", True)
    # Each is a switch; the runs without PCL keep theirs.
    assert cfg(ssl="pcl", val_fraction=0.1, normalize="half").data.val_fraction == 0.1
    assert cfg(ssl="pcl", normalize="half").clip.normalize == "half"
    plain = cfg()
    assert (plain.data.val_fraction, plain.clip.normalize) == (0.1, "half")


def test_pcl_fine_tuning_protocol_takes_the_pcl_codes_ft_classify_at_each_size():
    from kdhar.experiments import DatasetSpec

    def cfg(size, **overrides):
        return build_run_config("r3d_10", size=size, overrides=overrides, dataset=DatasetSpec("hmdb51", "h"),
                                fraction=1.0, seed=0)

    paper = cfg("paper", finetune_protocol="pcl")
    o = paper.optim
    assert (o.lr, o.momentum, o.weight_decay, o.batch_size, o.epochs) == (1e-3, 0.9, 5e-4, 8, 150)
    assert (o.schedule, o.plateau_patience, o.warmup) == ("plateau", 30, 0.0)
    assert (paper.clip.augment, paper.clip.hflip, paper.finetune.protocol) == (False, False, "pcl")
    assert paper.params()["finetune.protocol"] == "pcl"
    plain = cfg("paper")  # the size preset's supervised run, which logs no protocol
    assert (plain.optim.schedule, plain.clip.augment, plain.finetune.protocol) == ("cosine", True, "plain")
    assert "finetune.protocol" not in plain.params()
    # At size cpu the CPU preset's lr, batch and epochs stay, the patience keeps upstream's share.
    small = cfg("cpu", finetune_protocol="pcl")
    assert (small.optim.lr, small.optim.epochs, small.optim.schedule, small.optim.plateau_patience) == (0.02, 12, "plateau", 2)
    assert cfg("cpu", finetune_protocol="pcl", plateau_patience=5).optim.plateau_patience == 5  # options go on top
    # It selects and schedules by the validation loss, so it needs a validation split.
    with pytest.raises(SpecError, match=r"val_fraction=0.0: PCL's fine-tuning drops its lr and picks its epoch by the "
                                        r"validation loss: give --val-fraction > 0 \(default 0.1\), or --protocol plain"):
        cfg("cpu", finetune_protocol="pcl", val_fraction=0.0)


def test_a_pcl_grid_fine_tunes_its_students_as_pcls_code_unless_transfer_overrides_say_plain():
    import torch

    from kdhar.config import OptimConfig
    from kdhar.training.prepare import Optimisers

    transfer = {"name": "hmdb51", "root": "data/hmdb51"}
    pcl = plan(parse_spec(minimal(seeds=[0], fractions=[0.25], ssl="pcl", finetune=True, transfer=transfer)))
    fts = [c for c in pcl if c.role == "finetune"]
    assert fts and {(c.cfg.finetune.protocol, c.cfg.optim.schedule) for c in fts} == {("pcl", "plateau")}
    plain = plan(parse_spec(minimal(seeds=[0], fractions=[0.25], ssl="pcl", finetune=True, transfer=transfer,
                                    transfer_overrides={"finetune_protocol": "plain"})))
    assert {c.cfg.finetune.protocol for c in plain if c.role == "finetune"} == {"plain"}
    supervised = plan(parse_spec(minimal(seeds=[0], fractions=[0.25], finetune=True, transfer=transfer)))
    assert {c.cfg.finetune.protocol for c in supervised if c.role == "finetune"} == {"plain"}
    with pytest.raises(SpecError, match="finetune_protocol goes in transfer_overrides"):
        parse_spec(minimal(finetune=True, transfer=transfer, overrides={"finetune_protocol": "pcl"}))
    # The patience reaches the schedule the run steps.
    optimisers = Optimisers.build(torch.nn.Linear(2, 2), OptimConfig(schedule="plateau", plateau_patience=30), 1)
    assert optimisers.plateau.patience == 30


def test_a_pcl_grid_distils_by_eq_7_and_its_teachers_and_fine_tunes_see_the_students_normalisation():
    spec = parse_spec(minimal(seeds=[0], fractions=[0.25], ssl="pcl", overrides={"epochs": 3}, finetune=True,
                              transfer={"name": "hmdb51", "root": "data/hmdb51"}))
    assert (spec.weighting, spec.lam) == ("sum", 1.0)  # the paper's Eq. 7, lambda 1
    assert {c.cfg.clip.normalize for c in plan(spec)} == {"imagenet"}  # teachers, students, fine-tunes
    assert parse_spec(minimal(ssl="pcl", weighting="mix")).weighting == "mix"
    assert parse_spec(minimal()).weighting == "mix"  # plain KD grids keep theirs
    # A kd_stage: after_ssl student distils supervised, from its pretraining: mix, as the report reads it.
    assert parse_spec(minimal(ssl="pcl", kd_stage="after_ssl")).weighting == "mix"
    assert {c.cfg.clip.normalize for c in plan(parse_spec(minimal()))} == {"half"}


@pytest.mark.parametrize(("changes", "message"), [
    ({"ssl": "simclr"}, "ssl: 'simclr' must be one of none, pcl"),
    ({"overrides": {"ssl": "pcl"}}, "ssl goes at the top of the spec"),
    ({"fraction_overrides": {0.5: {"epochs": 2}}}, "fraction_overrides: 0.5 is not one of the fractions"),
    ({"fraction_overrides": {0.25: {"crop": 32}}}, "fraction_overrides.0.25 may not set crop"),
    ({"ssl": "pcl", "kd_stage": "after"}, "kd_stage: 'after' must be one of during_ssl, after_ssl (during_ssl: KD"),
    ({"kd_stage": "after_ssl"}, "kd_stage: after_ssl distils from an encoder pretrained inside PCL: add ssl: pcl"),
])
def test_pcl_and_fraction_spec_mistakes_name_the_key(changes, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(minimal(**changes))


def test_the_loss_spec_shares_the_cpu_grids_teachers_and_scratch_twins_and_differs_in_the_loss_only():
    # cpu-loss.yaml reruns cpu.yaml's RGB-teacher cells under the other weighting; run after
    # cpu.yaml, its teachers and scratch twins are found finished (same config_hash) and skipped.
    main, loss = (load_spec(REPO / "experiments" / n) for n in ("cpu.yaml", "cpu-loss.yaml"))
    assert main.experiment == loss.experiment and {main.weighting, loss.weighting} == {"mix", "sum"}
    main_cells, loss_cells = plan(main), plan(loss)

    def hashes(cells, role, teacher=None):
        return {cell_hash(c) for c in cells if c.role == role and (teacher is None or c.teacher == teacher)}

    assert hashes(loss_cells, "teacher") == {cell_hash(c) for c in main_cells
                                             if c.role == "teacher" and c.cfg.model.modality == "rgb"}
    assert hashes(loss_cells, "student", "none") == hashes(main_cells, "student", "none")
    main_kd = {(c.fraction, c.seed, c.teacher_id): c.cfg for c in main_cells if c.role == "student" and c.teacher != "none"}
    loss_kd = {(c.fraction, c.seed, c.teacher_id): c.cfg for c in loss_cells if c.role == "student" and c.teacher != "none"}
    assert loss_kd and set(loss_kd) <= set(main_kd)
    for key, cfg in loss_kd.items():
        assert dataclasses.replace(cfg, kd=main_kd[key].kd) == main_kd[key]  # the loss is the only difference


def test_kd_after_ssl_pretrains_each_student_inside_pcl_then_trains_it_supervised_from_that_encoder():
    spec = parse_spec(minimal(seeds=[0, 1], fractions=[0.25], ssl="pcl", kd_stage="after_ssl", overrides={"epochs": 3},
                              finetune=True, transfer={"name": "hmdb51", "root": "data/hmdb51"}))
    cells = plan(spec)
    waves = [c.wave for c in cells]
    assert waves == sorted(waves, key=["teacher", "pretrain", "scratch", "kd", "finetune"].index)
    pretrain = [c for c in cells if c.role == "pretrain"]
    students = [c for c in cells if c.role == "student"]
    assert len(pretrain) == 3 * 2 and all(c.cfg.pcl.ssl == "pcl" and c.teacher == "none" for c in pretrain)
    assert (waves.count("scratch"), waves.count("kd")) == (6, 8)  # as reading A: c3d<-r3d_18, r3d_18<-c3d, tiny3d<-both
    for c in students:  # scratch and KD alike start from their own pretraining, with its recipe, supervised
        assert any(c.source is p for p in pretrain) and (c.source.arch, c.source.seed) == (c.arch, c.seed)
        assert c.cfg.pcl.ssl == "none" and c.cfg.model.modality == "res"
        assert (c.cfg.clip, c.cfg.optim, c.cfg.data) == (c.source.cfg.clip, c.source.cfg.optim, c.source.cfg.data)
    assert all(c.source.role == "student" for c in cells if c.role == "finetune")  # fine-tunes start from the students
    kd = next(c for c in students if c.teacher != "none")
    assert kd.label() == "student c3d (from pcl) <- r3d_18 fraction=0.25 seed=0"
    assert pretrain[0].label() == "pretrain c3d (pcl) fraction=0.25 seed=0"
    # A KD cell's hash names its pretraining run as well as its teacher run.
    assert cell_hash(kd, source_run="a", teacher_run="t") != cell_hash(kd, source_run="b", teacher_run="t")
    with pytest.raises(ValueError, match="the run it starts from is needed"):
        cell_hash(kd, teacher_run="t")
    # KD inside PCL (reading A) stays the default: no pretraining cells.
    assert parse_spec(minimal(ssl="pcl")).kd_stage == "during_ssl"
    assert not [c for c in plan(parse_spec(minimal(ssl="pcl"))) if c.role == "pretrain"]


@pytest.mark.parametrize("name", ["paper.yaml", "cpu.yaml", "cpu-loss.yaml", "smoke.yaml", "pcl-cpu.yaml",
                                  "pcl-paper.yaml", "pcl-replication.yaml", "pcl-r3d.yaml"])
def test_shipped_specs_parse(name):
    spec = load_spec(REPO / "experiments" / name)
    cells = plan(spec)
    assert cells[0].role == "teacher"
    students = [c for c in cells if c.role == "student"]
    if name == "cpu.yaml":
        # Equal optimiser-step budgets across fractions, >= 2 runs of each teacher recipe (RGB and
        # residual frames), >= 20 paired seeds, an RGB student at width 4.
        assert {c.fraction: c.fraction * c.cfg.optim.epochs for c in students} == {0.5: 3.0, 0.25: 3.0}
        teachers = [(c.teacher_id, c.cfg.model.modality) for c in cells if c.role == "teacher"]
        assert teachers == [("c3d-rgb-s0", "rgb"), ("c3d-rgb-s1", "rgb"), ("c3d-res-s0", "res"), ("c3d-res-s1", "res")]
        assert len(spec.seeds) >= 20 and {(c.arch, c.cfg.model.width, c.cfg.model.modality) for c in students} == {
            ("c3d", 4, "rgb")}
        assert len(students) == len(spec.seeds) * 2 * (1 + len(teachers))
    if name == "pcl-replication.yaml":
        assert {(c.arch, c.cfg.model.width, c.fraction, c.cfg.pcl.ssl) for c in students} == {("c3d", 4, 0.25, "pcl")}
        assert len(spec.seeds) >= 15 and len(students) == 2 * len(spec.seeds)
    if name == "pcl-r3d.yaml":
        assert {(c.arch, c.cfg.model.width, c.fraction, c.cfg.pcl.ssl) for c in students} == {("r3d_10", 8, 0.25, "pcl")}
        assert len(spec.seeds) >= 9 and len(students) == 2 * len(spec.seeds)
    if name == "pcl-cpu.yaml":
        assert {(c.arch, c.cfg.model.width) for c in students} == {("c3d", 4), ("r3d_10", 8)}
    if name == "paper.yaml":
        assert spec.students == ["c3d", "r3d_18", "r2plus1d_18"] and spec.fractions == [1.0, 0.5, 0.25, 0.02]
        assert spec.finetune and spec.transfer.name == "hmdb51"
        # per seed: 3 teachers, 3 students x 4 fractions x (2 teachers + scratch), one fine-tune each
        assert len(cells) == 3 + 36 * len(spec.seeds) * 2
        cfg = cells[0].cfg
        assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.lr, cfg.model.width) == (200, 16, 0.01, 64)



def test_pcl_replication_shares_the_pcl_grid():
    """pcl-replication.yaml and pcl-r3d.yaml add seeds to pcl-cpu.yaml's 25 % cells (C3D, R3D-10) in
    the same experiment: the teacher and each cell's seeds 0-2 carry the same config_hash in both,
    so they train once."""
    grid = load_spec(REPO / "experiments" / "pcl-cpu.yaml")

    def hashes(spec, arch):
        out = {}
        for c in plan(spec):
            if c.role == "teacher" or c.role == "student" and c.arch == arch and c.fraction == 0.25:
                out[(c.role, c.arch, c.teacher, c.seed)] = cell_hash(c, teacher_run="t0")
        return out

    for name, arch in (("pcl-replication.yaml", "c3d"), ("pcl-r3d.yaml", "r3d_10")):
        more = load_spec(REPO / "experiments" / name)
        assert more.experiment == grid.experiment
        shared = hashes(grid, arch)
        assert {k: v for k, v in hashes(more, arch).items() if k in shared} == shared
        assert len([k for k in shared if k[0] == "student"]) == 6

# ---------------------------------------------------------------- end to end, real runs

TINY = {"width": 4, "clip_len": 4, "crop": 32, "epochs": 1, "test_clips": 1, "num_workers": 0, "batch_size": 8}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store and tiny synthetic UCF101/HMDB51-style sets, shared by the grid tests."""
    from kdhar.data.synthetic import SynthSpec, generate

    root = tmp_path_factory.mktemp("grid")
    spec = SynthSpec(num_classes=3, groups=6, clips_per_group=1, frames=8, size=(32, 48), seed=1)
    for layout in ("ucf101", "hmdb51"):
        generate(root / "data" / layout, layout=layout, spec=spec)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.chdir(root)  # checkpoints (runs/) and artifacts (mlruns/) land in the temporary folder
    yield root
    mp.undo()


def write_spec(root: Path, name: str, **changes) -> Path:
    raw = {
        "experiment": "grid",
        "dataset": {"name": "ucf101", "root": str(root / "data" / "ucf101")},
        "transfer": {"name": "hmdb51", "root": str(root / "data" / "hmdb51")},
        "size": "cpu",
        "overrides": TINY,
        "teachers": ["tiny3d"],
        "students": ["tiny3d", "c3d"],
        "self_distill": True,
        "fractions": [1.0],
        "seeds": [0],
        "finetune": False,
        **changes,
    }
    path = root / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_cpu_crop_larger_than_the_videos_is_refused_before_any_cell(store):
    from kdhar.experiments import run_grid

    # At size cpu the resize follows the crop, so only the videos' own 32x48 frames can bound it.
    path = write_spec(store, "big-crop.yaml", experiment="big-crop", overrides={**TINY, "crop": 40})
    with pytest.raises(SpecError, match=r"big-crop.yaml: crop=40: larger than the 32x48 frames of the videos"):
        run_grid(path, log=lambda line: None)


def test_grid_runs_resumes_and_reports(store):
    from kdhar import tracking
    from kdhar.checkpoint import load_checkpoint
    from kdhar.experiments import run_grid
    from kdhar.report import build_report

    lines: list[str] = []
    first = run_grid(write_spec(store, "a.yaml"), log=lines.append)
    assert [(o.cell.wave, o.status) for o in first] == [
        ("teacher", "done"), ("scratch", "done"), ("scratch", "done"), ("kd", "done"), ("kd", "done")]
    assert lines[-1].startswith("[5/5] student c3d <- tiny3d") and "done in" in lines[-1]
    runs = tracking.find_runs("grid")
    assert len(runs) == 5
    kd = next(r for r in runs if r["tags"].get("teacher_arch") == "tiny3d" and r["tags"]["arch"] == "c3d")
    assert kd["run_id"] == first[4].run_id and kd["tags"]["role"] == "student"
    # the KD run's hash names the teacher run it learnt from
    assert kd["tags"]["config_hash"] == cell_hash(first[4].cell, teacher_run=first[0].run_id)
    # finished cells are pruned to their best validation epoch's weights (the last ones are the logged model)
    assert not list((store / "runs" / "checkpoints").glob("*/last.pt"))
    best = {p.parent.name: load_checkpoint(p) for p in (store / "runs" / "checkpoints").glob("*/best.pt")}
    assert set(best) == {o.run_id for o in first}
    for run_id, state in best.items():
        history = [v for _, v in tracking.metric_history(run_id, "val_video_top1")]
        assert set(state) >= {"model", "epoch", "val_video_top1"} and "optimizer" not in state
        assert state["val_video_top1"] == max(history) == history[state["epoch"] - 1]

    # A dry run of the grid plus fine-tunes: the 5 finished cells are done, the 4 fine-tunes to train.
    status = grid_status(write_spec(store, "b.yaml", finetune=True))
    assert [run_id for _, run_id in status] == [o.run_id for o in first] + [None] * 4

    # Resuming: the same grid plus fine-tunes, in two worker processes, trains only the fine-tunes.
    lines.clear()
    second = run_grid(write_spec(store, "b.yaml", finetune=True), workers=2, log=lines.append)
    assert [o.status for o in second] == ["skipped"] * 5 + ["done"] * 4
    assert [o.run_id for o in second[:5]] == [o.run_id for o in first]
    assert sum("skipped" in line for line in lines) == 5
    fts = tracking.find_runs("grid", "tags.role = 'finetune'")
    assert {r["tags"]["source_run"] for r in fts} == {o.run_id for o in first[1:]}

    third = run_grid(write_spec(store, "b.yaml", finetune=True, keep_checkpoints=True), workers=2, log=lines.append)
    assert all(o.status == "skipped" for o in third)
    assert len(tracking.find_runs("grid")) == 9  # no new runs

    report = build_report("grid", store / "report")
    rows = {(r.student, r.teacher): r for r in report.rows}
    assert set(rows) == {("tiny3d", "none"), ("tiny3d", "tiny3d"), ("c3d", "none"), ("c3d", "tiny3d")}
    by_id = {r["run_id"]: r for r in runs}
    for (student, teacher), row in rows.items():
        (run_id,) = row.run_ids
        assert row.acc["final"].mean == pytest.approx(by_id[run_id]["metrics"]["final_test_video_top1"])
        assert row.transfer is not None and row.transfer.n == 1
    kd_row, scratch_row = rows[("c3d", "tiny3d")], rows[("c3d", "none")]
    assert kd_row.delta["final"] == pytest.approx(kd_row.acc["final"].mean - scratch_row.acc["final"].mean)
    assert "Student c3d on ucf101" in report.text and "scratch" in report.text
    names = sorted(p.name for p in report.files)
    assert names == ["curves_ucf101_c3d.png", "curves_ucf101_tiny3d.png", "delta_ucf101.png", "report.csv", "report.md"]
    assert all(p.stat().st_size > 0 for p in report.files)
    assert not tracking.find_runs("grid", "tags.role = 'report'")  # reports have an experiment of their own
    (logged,) = tracking.find_runs("grid-reports", "tags.role = 'report'")
    assert logged["run_id"] == report.run_id and logged["status"] == "FINISHED"


@pytest.mark.slow
def test_a_kd_after_ssl_grid_distils_from_each_students_pcl_pretraining_and_reports_it_apart(store):
    from kdhar import tracking
    from kdhar.experiments import run_grid
    from kdhar.report import build_report

    from kdhar.data.synthetic import SynthSpec, generate

    # Videos of 12 frames hold a tuple of three 4-frame clips; the teacher sees residual frames too.
    root = store / "data-pcl" / "ucf101"
    generate(root, layout="ucf101", spec=SynthSpec(num_classes=3, groups=6, clips_per_group=1, frames=12, size=(32, 48), seed=1))
    overrides = {**TINY, "pcl_interval": 0, "negatives": 4, "modality": "res"}
    path = write_spec(store, "after-ssl.yaml", experiment="after-ssl", students=["tiny3d"], ssl="pcl", kd_stage="after_ssl",
                      overrides=overrides, dataset={"name": "ucf101", "root": str(root)})
    done = run_grid(path, log=lambda line: None)
    assert [(o.cell.wave, o.status) for o in done] == [("teacher", "done"), ("pretrain", "done"), ("scratch", "done"),
                                                       ("kd", "done")]
    runs = {r["run_id"]: r for r in tracking.find_runs("after-ssl")}
    teacher, pretrain, scratch, kd = (runs[o.run_id] for o in done)
    assert pretrain["tags"]["role"] == "pretrain" and pretrain["tags"]["method"] == "pcl-ssl"
    for student in (scratch, kd):  # supervised from the pretraining run, its stages logged as models
        assert student["params"]["init"] == f"runs:/{pretrain['run_id']}" == f"runs:/{student['tags']['source_run']}"
        assert student["tags"]["kd_stage"] == "after_ssl" and student["tags"].get("ssl", "none") == "none"
        assert student["tags"]["stage_model_late"] == student["tags"]["model_uri"]
    assert kd["tags"]["teacher_run_id"] == teacher["run_id"] and kd["tags"]["pair_key"] == scratch["tags"]["pair_key"]
    assert [run_id for _, run_id in grid_status(path)] == [o.run_id for o in done]  # a rerun would skip them all

    rows = {(r.student, r.teacher): r for r in build_report("after-ssl", store / "report-after-ssl").rows}
    # Supervised KD after the pretraining takes mix, the supervised default, so its row carries no loss mark.
    assert set(rows) == {("tiny3d (pcl)", "none [after pcl]"), ("tiny3d (pcl)", "tiny3d [after pcl]")}
    kd_row, scratch_row = rows[("tiny3d (pcl)", "tiny3d [after pcl]")], rows[("tiny3d (pcl)", "none [after pcl]")]
    assert kd_row.delta["final"] == pytest.approx(kd_row.acc["final"].mean - scratch_row.acc["final"].mean)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # an exited worker may wait a moment to be reaped


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@SEVERAL_PROCESSES
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_grid_ends_its_runs_and_resumes_them_from_their_checkpoints(store):
    """Ctrl-C and SIGKILL of `kdhar experiment run` mid-wave: the workers stop with it and their runs end
    KILLED (none left RUNNING); the same command then continues those very runs from their last
    checkpoint, as it does a run left RUNNING by a worker that was killed outright."""
    from mlflow import MlflowClient

    from kdhar import tracking
    from kdhar.checkpoint import load_checkpoint
    from kdhar.experiments import run_grid

    exp = "killed"
    EPOCHS = 200  # noqa: N806
    # Students train for 200 tiny epochs (~25 s idle, minutes on a loaded machine) so the signal
    # reaches them mid-training; the test polls their checkpoints every 0.5 s. No validation split:
    # an epoch is then one training pass and one test pass, and the rerun's remainder costs less.
    spec = write_spec(store, "k.yaml", experiment=exp, teachers=["tiny3d"], students=["tiny3d"], self_distill=False,
                      seeds=[0, 1], overrides={**TINY, "epochs": EPOCHS, "val_fraction": 0.0},
                      teacher_overrides={"epochs": 1})

    def students(status: str) -> list[dict]:
        return tracking.find_runs(exp, f"tags.role = 'student' and attributes.status = '{status}'")

    def student_epochs() -> dict[str, int]:
        # Read from the checkpoint files, not the tracking store: while two workers log every step,
        # SQLite reads can lag a minute behind on a loaded machine.
        found = {}
        for path in (store / "runs" / "checkpoints").glob("*/last.pt"):
            try:
                state = load_checkpoint(path)
            except Exception:
                continue
            if state["config"].get("optim.epochs") == EPOCHS:
                found[path.parent.name] = state["epoch"]
        return found

    reached: dict[str, int] = {}
    for sig in (signal.SIGINT, signal.SIGKILL):
        # SIGINT as at a terminal: a shell's background job (CI started with `&`, nohup) inherits it
        # ignored, and a child started from there would never see the Ctrl-C this test sends.
        proc = subprocess.Popen([sys.executable, "-m", "kdhar.cli", "experiment", "run", str(spec), "--workers", "2"],
                                cwd=store, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            # Both students in flight, past where the previous signal left them (the second round
            # continues the same two runs: no third run appears).
            def progressed():
                now = student_epochs()
                moving = {k: v for k, v in now.items() if 0 < v < EPOCHS and v > reached.get(k, 0)}
                return now if len(moving) == 2 else None

            now = _wait_for(progressed, 180, "both student runs in flight")
            children = _children(proc.pid)
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=90)
        finally:
            proc.kill()
        assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), out
        if sig == signal.SIGINT:
            assert "aborted" in out and "Traceback" not in out, out
        else:
            assert set(now) == set(reached) and "resuming run" in out, out  # the same runs, continued
        assert children
        _wait_for(lambda: not any(_alive(pid) for pid in children), 60, "the grid's workers to exit")
        assert students("RUNNING") == []
        for run_id in now:
            assert tracking.run_status(run_id) == "KILLED", out
        reached = student_epochs()

    # A worker killed outright leaves its run RUNNING, its process gone: the rerun continues it too.
    client = MlflowClient()
    stale = sorted(reached)[0]
    client.update_run(stale, status="RUNNING")
    client.set_tag(stale, "pid", str(proc.pid))  # the grid process that was SIGKILLed above
    outcomes = run_grid(spec, workers=2, log=lambda _: None)
    assert outcomes[0].cell.role == "teacher" and outcomes[0].status == "skipped"
    finished = students("FINISHED")
    assert sorted(r["tags"]["seed"] for r in finished) == ["0", "1"]
    assert {r["run_id"] for r in finished} == set(reached) == {o.run_id for o in outcomes[1:]}
    for run_id in reached:  # every epoch trained once: resumed where the checkpoint was, not from 0
        assert sorted({step for step, _ in tracking.metric_history(run_id, "train_loss")}) == list(range(1, EPOCHS + 1))
    assert students("KILLED") == students("RUNNING") == students("FAILED") == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_killed_outright_is_one_line_naming_its_cell_and_its_run_is_ended(store):
    """A pool worker SIGKILLed mid-cell (as the out-of-memory killer does) broke the pool: the grid
    died with BrokenProcessPool's traceback and the cell's run stayed RUNNING. Now one line names the
    cell and its run, which is ended KILLED and resumes from its checkpoint on the next grid run."""
    from kdhar import tracking
    from kdhar.checkpoint import load_checkpoint
    from kdhar.experiments import interrupted_run

    exp = "worker-killed"
    spec = write_spec(store, "w.yaml", experiment=exp, teachers=["tiny3d"], students=["tiny3d"], self_distill=False,
                      overrides={**TINY, "epochs": 300})

    def training_worker():
        # The teacher's run and the pid of the worker training it, once its first checkpoint is written.
        for run in tracking.find_runs(exp, "tags.role = 'teacher' and attributes.status = 'RUNNING'"):
            path = store / "runs" / "checkpoints" / run["run_id"] / "last.pt"
            try:
                if path.exists() and load_checkpoint(path)["epoch"] >= 1:
                    return run["run_id"], int(run["tags"]["pid"])
            except Exception:  # noqa: BLE001 - being written; look again
                pass
        return None

    proc = subprocess.Popen([sys.executable, "-m", "kdhar.cli", "experiment", "run", str(spec), "--workers", "2"],
                            cwd=store, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id, worker = _wait_for(training_worker, 180, "the teacher's worker to write a checkpoint")
        assert worker != proc.pid and _alive(worker)
        os.kill(worker, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("Error: a grid worker process was killed"), err
    assert f"while training teacher tiny3d (run {run_id})" in lines[-1] and "ended KILLED" in lines[-1]
    assert "run the same `kdhar experiment run` again to resume" in lines[-1]
    assert tracking.run_status(run_id) == "KILLED"
    assert tracking.find_runs(exp, "attributes.status = 'RUNNING'") == []  # no claim or run left behind
    (teacher,) = [c for c in plan(load_spec(spec)) if c.role == "teacher"]
    key = cell_hash(teacher)
    assert interrupted_run(exp, teacher, key, log=lambda _: None) == f"runs/checkpoints/{run_id}/last.pt"


def test_report_on_missing_or_empty_experiment(store):
    from kdhar import tracking
    from kdhar.report import ReportError, build_report

    with pytest.raises(ReportError, match="'no-such' does not exist"):
        build_report("no-such", store / "r0")
    # An experiment whose only run is not a student has nothing to compare yet.
    with tracking.RunTracker("teachers-only", run_name="t", tags={"role": "teacher"}):
        pass
    report = build_report("teachers-only", store / "r1")
    assert report.rows == [] and "no finished student runs" in report.text and report.run_id is None
    assert not (store / "r1").exists()


def test_reconcile_ends_runs_whose_process_is_gone_here_or_whose_heartbeat_stopped_elsewhere(local_tracking, tmp_path):
    import os
    import socket

    from mlflow import MlflowClient

    from kdhar import tracking

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client = MlflowClient(local_tracking)
    exp = client.create_experiment("orphans")
    here, now = socket.gethostname(), time.time()
    cases = [("dead", here, gone.pid, None), ("alive", here, os.getpid(), None),
             ("elsewhere", "another-host", gone.pid, None),  # no heartbeat: nothing tells it is gone
             ("elsewhere-beating", "another-host", gone.pid, now - 30),
             ("elsewhere-silent", "another-host", gone.pid, now - tracking.STALE_S - 60)]
    runs = {}
    for name, host, pid, beat in cases:
        tags = {"host": host, "pid": str(pid), **({tracking.HEARTBEAT_TAG: str(int(beat))} if beat else {})}
        runs[name] = client.create_run(exp, tags=tags, run_name=name).info.run_id
    done = subprocess.run([sys.executable, "-m", "kdhar.cli", "runs", "reconcile", "--experiment", "orphans"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ended 2 run(s) as KILLED" in done.stdout
    assert tracking.run_status(runs["dead"]) == tracking.run_status(runs["elsewhere-silent"]) == "KILLED"
    for name in ("alive", "elsewhere", "elsewhere-beating"):
        assert tracking.run_status(runs[name]) == "RUNNING", name
    neither = subprocess.run([sys.executable, "-m", "kdhar.cli", "runs", "reconcile"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert neither.returncode == 2 and "give --study-name" in neither.stderr


def test_a_reused_pid_does_not_keep_a_dead_runners_claim_or_run_alive(local_tracking, tmp_path):
    """After a container restart the pid of a dead runner (often 1) belongs to a live process again:
    the start time recorded beside host and pid tells them apart."""
    import os
    import socket

    from mlflow import MlflowClient

    from kdhar import tracking
    from kdhar.experiments import Claims

    mine = tracking.process_tags()
    assert mine["pid_started"] == tracking.process_start(os.getpid()) and mine["pid_started"].count(":") == 1
    with tracking.RunTracker("reused", run_name="r", tags={"host": socket.gethostname(), "pid": str(os.getpid())}) as run:
        assert MlflowClient().get_run(run.run_id).data.tags["pid_started"] == mine["pid_started"]

    # This very process's pid, but a start time it never had: a runner from before a restart.
    boot = mine["pid_started"].split(":")[0]
    earlier_life = {**mine, "pid_started": f"{boot}:1"}
    stale_claim = tracking.create_claim("reused", "cellkey", "claim-old", earlier_life)
    claims = Claims("reused")
    try:
        assert claims.take({"cellkey": "cell"}) == {"cellkey"}  # the old claim does not count
    finally:
        claims.release_all()
    assert MlflowClient().get_run(stale_claim).info.lifecycle_stage == "deleted"

    client = MlflowClient(local_tracking)
    exp = client.get_experiment_by_name("reused").experiment_id
    reused = client.create_run(exp, tags=earlier_life, run_name="reused").info.run_id
    claim = tracking.create_claim("reused", "other", "claim-other", earlier_life)
    live = client.create_run(exp, tags=mine, run_name="live").info.run_id
    done = subprocess.run([sys.executable, "-m", "kdhar.cli", "runs", "reconcile", "--experiment", "reused"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ended 2 run(s) as KILLED" in done.stdout
    assert tracking.run_status(reused) == tracking.run_status(claim) == "KILLED"
    assert tracking.run_status(live) == "RUNNING"


def test_reconcile_of_an_experiment_that_does_not_exist_says_so(local_tracking, tmp_path):
    from mlflow import MlflowClient

    MlflowClient(local_tracking).create_experiment("orphans")
    done = subprocess.run([sys.executable, "-m", "kdhar.cli", "runs", "reconcile", "--experiment", "orphanz"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"Error: experiment 'orphanz' does not exist at {local_tracking}; check --experiment "
        "(`mlflow experiments search` lists them)"]


@SEVERAL_PROCESSES
@pytest.mark.slow
def test_two_runners_on_one_spec_train_each_cell_once(store):
    """Two `kdhar experiment run` on the same spec at once: each cell is claimed by one of them, the
    other waits for it, and both end with the whole grid trained exactly once."""
    from kdhar import tracking

    exp = "twice"
    spec = write_spec(store, "t.yaml", experiment=exp, teachers=["tiny3d"], students=["tiny3d"], self_distill=True,
                      seeds=[0, 1], overrides={**TINY, "epochs": 3}, teacher_overrides={"epochs": 3})
    cmd = [sys.executable, "-m", "kdhar.cli", "experiment", "run", str(spec)]
    procs = [subprocess.Popen(cmd, cwd=store, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = tracking.find_runs(exp)
    cells = [(r["tags"]["role"], r["tags"].get("teacher_arch"), r["tags"]["seed"]) for r in runs]
    assert sorted(cells) == sorted([("teacher", "none", "0"), ("student", "none", "0"), ("student", "none", "1"),
                                    ("student", "tiny3d", "0"), ("student", "tiny3d", "1")]), cells
    assert all(r["status"] == "FINISHED" for r in runs)
    assert "another runner is training it; waiting" in "".join(outs)
    assert tracking.find_runs(exp, "tags.role = 'claim'") == []  # claims are removed once done


def test_a_run_beats_while_it_trains_and_a_silent_claim_of_another_machine_is_taken_over(local_tracking, monkeypatch):
    from mlflow import MlflowClient

    from kdhar import tracking
    from kdhar.experiments import Claims
    from kdhar.tracking import liveness

    monkeypatch.setattr(liveness, "HEARTBEAT_S", 0.2)  # Heartbeat reads its default interval there
    with tracking.RunTracker("beats", run_name="r") as run:
        first = int(MlflowClient().get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG])
        assert abs(first - time.time()) < 30
        time.sleep(1.5)  # several beats
        assert int(MlflowClient().get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG]) > first  # it beat again
    ended = tracking.run_status(run.run_id)
    assert ended == "FINISHED"

    # A claim of another machine: alive while it beats, taken over once its heartbeat is stale.
    key = "cellkey"
    old = str(int(time.time() - tracking.STALE_S - 60))
    silent = tracking.create_claim("beats", key, "claim-x", {"host": "another-host", "pid": "1",
                                                             tracking.HEARTBEAT_TAG: old})
    claims = Claims("beats")
    claims.start()
    try:
        assert claims.take({key: "cell"}) == {key}  # the silent claim does not count (and is deleted)
        assert MlflowClient().get_run(silent).info.lifecycle_stage == "deleted"
        beating = tracking.create_claim("beats", "other", "claim-y", {"host": "another-host", "pid": "1",
                                                                      tracking.HEARTBEAT_TAG: str(int(time.time()))})
        assert claims.take({"other": "cell"}) == set() and claims.held_elsewhere("other")
        assert tracking.run_status(beating) == "RUNNING"
    finally:
        claims.stop()
        claims.release_all()


def test_a_grid_of_too_few_seeds_says_so_before_it_trains(store):
    from click.testing import CliRunner

    from kdhar.cli import cli

    few = CliRunner().invoke(cli, ["experiment", "run", str(write_spec(store, "few.yaml", seeds=[0, 1, 2])), "--dry-run"])
    assert few.exit_code == 0, few.output
    assert "few.yaml: 3 paired seeds: the report's sign-flip test cannot go below p = 0.25" in few.stderr
    assert few.stdout.strip().splitlines()[-1].endswith("to train")  # a note, not a refusal
    enough = CliRunner().invoke(cli, ["experiment", "run", str(write_spec(store, "six.yaml", seeds=list(range(6)))),
                                      "--dry-run"])
    assert enough.exit_code == 0 and "paired seed" not in enough.stderr
    smoke = CliRunner().invoke(cli, ["experiment", "run", str(write_spec(store, "one.yaml", seeds=[0])), "--dry-run"])
    assert smoke.exit_code == 0 and "paired seed" not in smoke.stderr  # one seed is a smoke run, not a comparison
