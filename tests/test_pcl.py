"""PCL as a training method: the step's terms, KD inside it, retrieval, and runs end to end."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from kdhar.config import ClipConfig, DataConfig, KDConfig, ModelConfig, OptimConfig, PCLConfig, RunConfig
from kdhar.data.index import load_index
from kdhar.data.synthetic import SynthSpec, generate
from kdhar.models import build_model
from kdhar.objectives import build_objective
from kdhar.objectives.factory import Teacher
from kdhar.objectives.kd import LogitKD, kd_term
from kdhar.objectives.pcl import PCLStep
from kdhar.retrieval import topk_hits
from kdhar.train import run_training
from kdhar.training.listeners.checkpoints import heads_state as _heads

KDHAR = [sys.executable, "-m", "kdhar.cli"]


def tuple_batch(b: int = 4, classes: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "clips": torch.randn(b, 3, 3, 4, 16, 16, generator=g),
        "label": torch.arange(b) % classes,
        "pretext": torch.tensor([0, 1, 2, 3])[:b],
        "index": torch.arange(b),
    }


def make_step(labels=True, teacher=None, contrast="nce", weighting="mix"):
    torch.manual_seed(0)
    model = build_model("tiny3d", 3, width=4, dropout=0.0)
    pcl = PCLConfig(ssl="pcl", contrast=contrast, negatives=8)
    kd = LogitKD(teacher, tau=4.0, weighting=weighting, alpha=0.5, lam=1.0) if teacher is not None else None
    return PCLStep(model, num_rows=6, pcl=pcl, tuple_len=3, labels=labels, kd=kd)


def test_pcl_loss_is_pretext_plus_half_the_contrast_plus_the_action_terms():
    b = tuple_batch()
    step = make_step().eval()  # BatchNorm on running statistics, so clips can be scored one by one below
    bank0 = step.nce.bank0.clone()
    out = step(b["clips"], b["label"], b["pretext"], b["index"])
    assert out["loss"].item() == pytest.approx(
        (out["pretext_loss"] + 0.5 * (out["nce0_loss"] + out["nce2_loss"]) + out["task_loss"]).item(), rel=1e-6)
    # The action term is CE on the first and last clips (not the transformed middle one), averaged.
    model = step.model
    with torch.no_grad():
        ends = torch.cat([model(b["clips"][:, 0]), model(b["clips"][:, 2])])
        want = F.cross_entropy(ends, torch.cat([b["label"], b["label"]]))
        pooled = torch.stack([model.forward_features(b["clips"][:, k]).mean(dim=(2, 3, 4)) for k in range(3)], 1)
        pretext = F.cross_entropy(step.pretext_head(pooled.flatten(1)), b["pretext"])
    assert out["task_loss"].item() == pytest.approx(want.item(), rel=1e-4)
    assert out["pretext_loss"].item() == pytest.approx(pretext.item(), rel=1e-4)
    assert out["output"].shape == (4, 3) and torch.equal(out["target"], b["label"])
    assert not torch.equal(step.nce.bank0, bank0)  # the banks moved after scoring
    # Validation scores the pretext task only and leaves the banks alone.
    moved = step.nce.bank0.clone()
    val = step.validate(b["clips"], b["label"], b["pretext"], b["index"])
    assert set(val) == {"pretext_loss", "pretext_correct"} and torch.equal(step.nce.bank0, moved)


def test_label_free_pcl_trains_no_action_head_and_scores_the_pretext_task():
    b = tuple_batch()
    step = make_step(labels=False, contrast="ntxent")
    out = step(b["clips"], b["label"], b["pretext"], b["index"])
    assert "task_loss" not in out and "nce0_loss" not in out
    assert out["loss"].item() == pytest.approx((out["pretext_loss"] + 0.5 * out["ntxent_loss"]).item(), rel=1e-6)
    assert out["output"].shape == (4, 5) and torch.equal(out["target"], b["pretext"])
    out["loss"].backward()
    assert step.model.head.fc.weight.grad is None  # the classifier takes no part
    assert step.pretext_head.weight.grad is not None and step.projector.net[0].weight.grad is not None


def test_kd_inside_pcl_feeds_the_teacher_exactly_the_students_untransformed_clips():
    torch.manual_seed(1)
    teacher = build_model("tiny3d", 3, width=4, dropout=0.0)
    with torch.no_grad():
        teacher.head.fc.weight.mul_(300)  # a confident teacher, so the soft term is far from zero
    seen = []
    teacher.register_forward_hook(lambda _m, args, out: seen.append((args[0].detach().clone(), out.detach().clone())))
    b = tuple_batch()
    step = make_step(teacher=teacher, weighting="sum").eval()
    out = step(b["clips"], b["label"], b["pretext"], b["index"])
    [(x, t_logits)] = seen
    want = torch.stack([b["clips"][:, 0], b["clips"][:, 2]], 1).flatten(0, 1)  # sample by sample: first, last
    assert torch.equal(x, want)
    with torch.no_grad():
        s_logits = step.model(want)
    assert out["kd_loss"].item() == pytest.approx(kd_term(s_logits, t_logits, 4.0).item(), rel=1e-4)
    assert out["kd_loss"].item() > 0.01
    assert out["loss"].item() == pytest.approx(
        (out["pretext_loss"] + 0.5 * (out["nce0_loss"] + out["nce2_loss"]) + out["task_loss"] + out["kd_loss"]).item(),
        rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())  # frozen
    assert not any(k.startswith("kd.") for k in step.state_dict())  # the teacher is not saved with the student


@pytest.mark.parametrize("arch", ["c3d", "r3d_18", "mc3_18", "r2plus1d_18", "tiny3d"])
def test_every_registry_backbone_trains_inside_pcl_from_a_teacher_of_another_architecture(arch):
    from kdhar.models import MODELS

    assert arch in MODELS
    torch.manual_seed(0)
    teacher = build_model("c3d" if arch != "c3d" else "r3d_18", 3, width=4)
    step = PCLStep(build_model(arch, 3, width=4, modality="res"), num_rows=4, pcl=PCLConfig(ssl="pcl", negatives=8),
                   kd=LogitKD(teacher, weighting="mix"))
    b = tuple_batch()
    out = step(b["clips"], b["label"], b["pretext"], b["index"])
    out["loss"].backward()
    assert out["output"].shape == (4, 3) and torch.isfinite(out["loss"])
    assert step.pretext_head.in_features == 3 * step.model.head.fc.in_features
    assert all(p.grad is not None for p in step.model.backbone.parameters() if p.requires_grad)


def test_a_resumable_pcl_checkpoint_holds_the_heads_and_banks_but_not_the_model_twice():
    heads = _heads(make_step())
    assert {k.split(".")[0] for k in heads} == {"pretext_head", "projector", "nce"}
    assert {k for k in heads if k.startswith("nce.")} == {"nce.bank0", "nce.bank2"}


def test_a_resumed_pcl_run_continues_with_the_memory_banks_it_checkpointed(tmp_path):
    from types import SimpleNamespace

    from kdhar.checkpoint import load_checkpoint
    from kdhar.training.listeners.checkpoints import Checkpointer
    from kdhar.training.loop import Epoch, RunState
    from kdhar.training.prepare import Optimisers, _restore

    def prepared(step):
        return SimpleNamespace(model=step.model, step=step, optimisers=Optimisers.build(step, OptimConfig(), 1),
                               cfg=RunConfig(pcl=PCLConfig(ssl="pcl")), role="pretrain", resume=None, changed={},
                               objective=SimpleNamespace(teacher=None, name="pcl"),
                               splits=SimpleNamespace(classes=["a", "b", "c"]), ddp=None)

    trained = make_step()
    b = tuple_batch()
    for _ in range(2):  # the banks move away from their random start
        trained(b["clips"], b["label"], b["pretext"], b["index"])
    checkpointer = Checkpointer(tmp_path)
    run = RunState(prepared(trained), tracker=None, run_id="r", history=[{"epoch": 1}])
    checkpointer.on_run_start(run)
    checkpointer.on_epoch_end(run, Epoch(0, {}, {}))

    torch.manual_seed(7)  # a fresh process: other random banks
    fresh = PCLStep(build_model("tiny3d", 3, width=4, dropout=0.0), num_rows=6, pcl=PCLConfig(ssl="pcl", negatives=8))
    assert not torch.equal(fresh.nce.bank0, trained.nce.bank0)
    _restore(prepared(fresh), load_checkpoint(tmp_path / "checkpoints" / "r" / "last.pt"))
    for name in ("bank0", "bank2"):
        assert torch.equal(getattr(fresh.nce, name), getattr(trained.nce, name)), name


def test_contrastive_logits_are_float32_under_bf16_autocast():
    from kdhar.objectives.contrast import MemoryBankNCE

    z0, z2 = (F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(s)), dim=1) for s in (1, 2))
    index = torch.arange(4)
    losses = {}
    for name, enabled in (("bf16", True), ("fp32", False)):
        torch.manual_seed(0)  # the same banks and negatives each time
        nce = MemoryBankNCE(6, dim=16, negatives=8)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            losses[name] = nce(z0, z2, index)
    for term in ("nce0_loss", "nce2_loss"):  # bf16 logits near 1/0.07 = 14 come in steps of 1/16
        torch.testing.assert_close(losses["bf16"][term], losses["fp32"][term], rtol=0, atol=1e-6)
    draw = torch.randint(6, (4, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (*nce.logits(z0, z2, draw), *nce.logits(z0.bfloat16(), z2.bfloat16(), draw))
    assert all(t.dtype == torch.float32 for t in logits)
    # In the step, the projector runs in float32 too: its term under autocast is the float32 one.
    terms = {}
    for name, enabled in (("bf16", True), ("fp32", False)):
        step = make_step()  # same weights, banks and random draws each time
        pooled = torch.randn(4, 3, step.model.head.fc.in_features)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            terms[name] = step.contrastive(pooled, index, {})
    torch.testing.assert_close(terms["bf16"], terms["fp32"], rtol=0, atol=1e-5)


def test_factory_names_methods_and_refuses_impossible_combinations():
    cfg = RunConfig(pcl=PCLConfig(ssl="pcl"))
    teacher = Teacher(model=build_model("tiny3d", 3, width=4), uri="runs:/t", classes=["a", "b", "c"], arch="tiny3d")
    assert build_objective(cfg).name == "pcl" and build_objective(cfg).view == "tuple"
    assert build_objective(cfg, teacher).name == "pcl+kd-logit"
    assert build_objective(cfg, labels=False).registry_label == "pretrain"
    assert build_objective(cfg, teacher).terms[-1] == "kd_loss"
    with pytest.raises(ValueError, match="takes no teacher"):
        build_objective(cfg, teacher, labels=False)
    with pytest.raises(ValueError, match="leave --cache-teacher out"):
        build_objective(cfg, teacher, cache_teacher=True)
    with pytest.raises(ValueError, match="use --ssl pcl"):
        build_objective(RunConfig(), labels=False)


def test_the_sskd_preset_is_mix_with_alpha_0_9_and_refuses_another_alpha():
    from kdhar.cli import UserError, kd_settings

    assert kd_settings(None, "sskd", None, None) == {"tau": None, "weighting": "mix", "alpha": 0.9, "lam": None}
    assert kd_settings(4.0, "sum", None, 2.0)["weighting"] == "sum"
    with pytest.raises(UserError, match="--kd-weighting sskd means alpha 0.9"):
        kd_settings(None, "sskd", 0.5, None)


def test_retrieval_counts_a_hit_when_any_of_the_k_nearest_shares_the_class():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.1]])
    gallery_labels = np.array([0, 1, 2, 0])
    query = np.array([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.0]])
    query_labels = np.array([1, 1, 2])
    hits = topk_hits(query, query_labels, gallery, gallery_labels, ks=(1, 2, 3, 4, 10))
    # Independently: rank the gallery by cosine similarity for each query.
    expected = {}
    for k in (1, 2, 3):
        count = 0
        for q, label in zip(query, query_labels):
            sims = gallery @ q / (np.linalg.norm(gallery, axis=1) * np.linalg.norm(q))
            count += label in gallery_labels[np.argsort(-sims)[:k]]
        expected[f"retrieval_top{k}"] = count / len(query)
    assert hits == pytest.approx(expected)
    assert hits["retrieval_top1"] == pytest.approx(1 / 3) and hits["retrieval_top3"] == 1.0


def test_retrieval_reports_no_k_that_spans_the_whole_gallery():
    # 12 gallery videos of 3 classes: from k = 12 on every query sees all of them, so top-20 and
    # top-50 would read 1.0 whatever the features; only the k below the gallery's size are scores.
    rng = np.random.default_rng(0)
    gallery, gallery_labels = rng.normal(size=(12, 8)), np.arange(12) % 3
    query, query_labels = rng.normal(size=(6, 8)), np.arange(6) % 3
    hits = topk_hits(query, query_labels, gallery, gallery_labels)
    assert sorted(hits) == ["retrieval_top1", "retrieval_top10", "retrieval_top5"]
    assert sorted(topk_hits(query, query_labels, gallery[:5], gallery_labels[:5])) == ["retrieval_top1"]


def test_retrieval_features_are_upstreams_9216_for_r3d_10_clips_of_10_frames_at_112():
    from kdhar.retrieval import clip_feature

    torch.manual_seed(0)
    model = build_model("r3d_10", 101, width=64, modality="res").eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(1, 3, 10, 112, 112))
    assert maps.shape[1:] == (512, 2, 7, 7)
    assert clip_feature(maps).shape == (1, 9216)  # MaxPool3d((1, 2, 2)) drops the 7th row and column
    assert clip_feature(maps, "ceil").shape == (1, 16384)
    assert clip_feature(torch.randn(2, 16, 1, 1, 1)).shape == (2, 16)  # a 1-wide map is not emptied


def test_pcl_distillation_weighs_kd_by_eq_7_unless_told_otherwise():
    from kdhar.cli import kd_settings

    assert kd_settings(None, None, None, None, "pcl")["weighting"] == "sum"  # CE + 1 * KD
    assert kd_settings(None, None, None, None, "none")["weighting"] == "mix"
    assert kd_settings(None, "mix", 0.5, None, "pcl")["weighting"] == "mix"


def test_a_teacher_trained_on_otherwise_normalised_clips_is_refused_naming_the_fix():
    from kdhar.distill import check_teacher_clips

    teacher = Teacher(model=build_model("tiny3d", 3, width=4), uri="runs:/t", classes=["a", "b", "c"], normalize="half")
    student = RunConfig(clip=ClipConfig(normalize="imagenet"))
    with pytest.raises(ValueError, match="normalised 'half' but the student's are 'imagenet'.*--normalize half"):
        check_teacher_clips(teacher, student)
    check_teacher_clips(dataclasses.replace(teacher, normalize="imagenet"), student)


def test_imagenet_normalisation_uses_imagenets_mean_and_std():
    from kdhar.data.transforms import apply_params, draw_params

    frames = np.full((2, 8, 8, 3), 128, dtype=np.uint8)
    params = draw_params(None, (8, 8), None, 8, augment=False)
    x = apply_params(frames, params, "imagenet")
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[:, 0, 0, 0], (128 / 255 - mean) / std)
    assert torch.allclose(apply_params(frames, params), torch.tensor((128 / 255 - 0.5) / 0.5), atol=1e-6)  # "half"


def test_a_bank_smaller_than_its_negatives_is_tagged_and_said_in_one_line(capsys):
    cfg = RunConfig(pcl=PCLConfig(ssl="pcl", negatives=1024))
    small = build_objective(cfg)
    small.make_step(build_model("tiny3d", 3, width=4), 190)  # a 2 % share of UCF101
    assert (small.tags["bank_rows"], small.tags["bank_below_negatives"]) == ("190", "true")
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "190 rows" in line and "fewer than its 1024 negatives" in line
    large = build_objective(cfg)
    large.make_step(build_model("tiny3d", 3, width=4), 2000)
    assert large.tags["bank_below_negatives"] == "false" and capsys.readouterr().err == ""


def test_stages_read_the_test_accuracy_at_the_lowest_ssl_validation_loss_beside_last_and_best():
    from types import SimpleNamespace

    from kdhar.training.listeners.scores import StageAccuracy
    from kdhar.training.loop import Epoch, RunState

    listener = StageAccuracy(4, "ssl_val_pretext_loss")  # stages after epochs 1, 3 and 4
    run = RunState(SimpleNamespace(), tracker=None, run_id="r", history=[])
    for index, (acc, loss) in enumerate([(0.2, 1.0), (0.5, 0.7), (0.4, 0.8), (0.6, 0.75)]):
        epoch = Epoch(index, {}, {"test_video_top1": acc, "ssl_val_pretext_loss": loss})
        listener.on_epoch_metrics(run, epoch)
        run.history.append({"epoch": epoch.done, **epoch.metrics})
    early, mid, late = run.history[0], run.history[2], run.history[3]
    assert (early["acc_early"], early["best_acc_early"], early["sel_acc_early"]) == (0.2, 0.2, 0.2)
    assert (mid["acc_mid"], mid["best_acc_mid"], mid["sel_acc_mid"], mid["sel_epoch_mid"]) == (0.4, 0.5, 0.5, 2.0)
    assert (late["acc_late"], late["best_acc_late"], late["sel_acc_late"], late["sel_epoch_late"]) == (0.6, 0.6, 0.5, 2.0)


def test_best_pt_of_a_pcl_run_is_the_epoch_of_lowest_ssl_validation_loss(tmp_path):
    from kdhar.checkpoint import load_checkpoint
    from kdhar.training.listeners.checkpoints import save_epoch

    path, history = tmp_path / "last.pt", []
    for epoch, loss in enumerate([1.0, 0.7, 0.8, 0.7], start=1):
        history.append({"epoch": epoch, "ssl_val_pretext_loss": loss, "test_video_top1": 0.1 * epoch})
        state = {"model": {"w": torch.full((1,), float(epoch))}, "epoch": epoch, "run_id": "r", "classes": ["a"],
                 "arch": "tiny3d", "config": {}, "identity": {"role": "pretrain", "method": "pcl"}}
        save_epoch(path, state, history, None, "ssl_val_pretext_loss")
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2 and best["ssl_val_pretext_loss"] == 0.7  # a tie later does not replace it


# ---------------------------------------------------------------- runs on real (synthetic) videos

@pytest.fixture(scope="module")
def pcl_set(tmp_path_factory) -> Path:
    """16-frame videos (a 4-frame tuple 1 apart needs 14), one of them replaced by an 8-frame video."""
    base = tmp_path_factory.mktemp("pcl")
    root, short = base / "ucf101", base / "short"
    generate(root, "ucf101", SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=16, size=(48, 64), seed=3))
    generate(short, "ucf101", SynthSpec(num_classes=3, groups=3, clips_per_group=1, frames=8, size=(48, 64), seed=3))
    listed = (root / "trainlist01.txt").read_text().split()[0]
    shutil.copy(next(short.rglob("*.avi")), root / listed)
    return root


def pcl_config(root: Path, ssl: str = "pcl", epochs: int = 2) -> RunConfig:
    return RunConfig(
        data=DataConfig(root=str(root), num_workers=0, val_fraction=0.2),
        clip=ClipConfig(clip_len=4, frame_interval=1, test_clips=2, resize=(40, 53), crop=32, augment=False, hflip=False,
                        normalize="imagenet"),  # what distill --ssl pcl normalises with, teacher included
        model=ModelConfig(arch="tiny3d", width=4, dropout=0.0, modality="res"),
        optim=OptimConfig(epochs=epochs, batch_size=8, threads=1, lr=0.02),
        kd=KDConfig(),
        pcl=PCLConfig(ssl=ssl, interval=1, negatives=16),
    )


def test_retrieval_gallery_is_the_whole_training_list_whatever_the_fraction_and_hold_out(pcl_set):
    from kdhar.retrieval import retrieval_on_splits
    from kdhar.training.splits import load_splits

    part_cfg = pcl_config(pcl_set)
    part_cfg = dataclasses.replace(part_cfg, data=dataclasses.replace(part_cfg.data, fraction=0.25, val_fraction=0.2))
    whole_cfg = dataclasses.replace(part_cfg, data=dataclasses.replace(part_cfg.data, fraction=1.0, val_fraction=0.0))
    part, whole = load_splits(part_cfg), load_splits(whole_cfg)
    assert len(part.train.samples) + len(part.val.samples) < len(whole.train.samples)
    torch.manual_seed(0)
    model = build_model("tiny3d", 3, width=4, modality="res")
    scores = retrieval_on_splits(model, part_cfg, part, "cpu")
    assert scores["retrieval_gallery_videos"] == len(whole.train.samples)
    assert scores == retrieval_on_splits(model, whole_cfg, whole, "cpu")


@pytest.mark.slow
def test_pretrain_then_distill_inside_pcl_log_every_term_and_the_encoder_carries_over(local_tracking, pcl_set, tmp_path):
    client = MlflowClient(local_tracking)
    cfg = pcl_config(pcl_set)
    pre = run_training(cfg, role="pretrain", experiment="pcl", objective=build_objective(cfg, labels=False),
                       workdir=tmp_path, progress=False)
    run = client.get_run(pre.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "pcl-ssl" and run.data.tags["ssl"] == "pcl"
    m = run.data.metrics
    for key in ("train_pretext_loss", "train_nce0_loss", "train_nce2_loss", "train_pretext_acc", "ssl_val_pretext_loss",
                "ssl_val_pretext_acc", "epoch_lr", "retrieval_top1", "retrieval_top5", "too_short_videos"):
        assert key in m, key
    assert m["too_short_videos"] == 1.0  # the 8-frame video was left out, and counted
    assert "final_test_video_top1" not in m and "train_task_loss" not in m  # no labels, no classifier
    assert run.data.params["pcl.ssl"] == "pcl" and run.data.params["model.modality"] == "res"
    assert run.info.run_name == "pretrain-pcl-tiny3d-f1-s0"
    assert [str(v.version) for v in client.search_model_versions("name = 'kdhar-pretrain-tiny3d'")] == ["1"]

    # A supervised teacher of another width on the same clips, then a PCL student distilled from it.
    teacher_cfg = dataclasses.replace(pcl_config(pcl_set, ssl="none", epochs=1),
                                      model=ModelConfig(arch="tiny3d", width=6, dropout=0.0))
    teacher = run_training(teacher_cfg, role="teacher", experiment="pcl", workdir=tmp_path, progress=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": local_tracking}
    common = ["--student", "tiny3d", "--ssl", "pcl", "--root", str(pcl_set), "--epochs", "2", "--width", "4",
              "--clip-len", "4", "--frame-interval", "1", "--crop", "32", "--test-clips", "2", "--pcl-interval", "1",
              "--negatives", "16", "--num-workers", "0", "--threads", "1", "--batch-size", "8", "--experiment", "pcl",
              "--init", f"runs:/{pre.run_id}"]
    for spec in (f"runs:/{teacher.run_id}", "none"):
        done = subprocess.run([*KDHAR, "distill", "--teacher", spec, *common], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    exp = client.get_experiment_by_name("pcl").experiment_id
    students = {r.data.tags["method"]: r for r in client.search_runs([exp], "tags.role = 'student'")}
    assert set(students) == {"pcl", "pcl+kd-logit"}
    kd = students["pcl+kd-logit"]
    for key in ("train_pretext_loss", "train_nce0_loss", "train_task_loss", "train_kd_loss", "test_video_top1",
                "ssl_val_pretext_loss", "retrieval_top1", "acc_late", "best_acc_late", "sel_acc_late", "epoch_lr"):
        assert key in kd.data.metrics, key
    # PCL's protocol by default: no hold-out, every training-list video in the retrieval gallery, Eq. 7.
    assert kd.data.params["val_videos"] == "0" and kd.data.params["kd.weighting"] == "sum"
    listed = len(load_index("ucf101", str(pcl_set), 1, "train").samples)
    assert kd.data.params["train_videos"] == str(listed) and kd.data.metrics["retrieval_gallery_videos"] == listed
    assert kd.data.tags["bank_rows"] == str(listed - 1)  # one row per video long enough for a tuple
    assert kd.data.tags["teacher_run_id"] == teacher.run_id
    assert kd.data.tags["pair_key"] == students["pcl"].data.tags["pair_key"]  # the pair is like for like
    # Both start from the encoder: named for it, and paired with each other
    assert kd.info.run_name == "init-pcl-kd-tiny3d→tiny3d-f1-s0" and students["pcl"].info.run_name == "init-pcl-scratch-tiny3d-f1-s0"
    assert {m.name for m in client.search_registered_models()} >= {"kdhar-pcl-kd-tiny3d", "kdhar-pcl-scratch-tiny3d"}

    # The logged student evaluates as any model, and retrieval reads its trunk.
    scored = subprocess.run([*KDHAR, "evaluate", "--model", f"runs:/{kd.info.run_id}", "--retrieval", "true",
                             "--root", str(pcl_set), "--num-workers", "0", "--experiment", "pcl"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "test_video_top1=" in scored.stdout and "retrieval_top5=" in scored.stdout


@pytest.mark.slow
def test_videos_too_short_for_any_tuple_are_one_clear_error(local_tracking, pcl_set, tmp_path):
    cfg = pcl_config(pcl_set)
    cfg = dataclasses.replace(cfg, pcl=dataclasses.replace(cfg.pcl, interval=8))  # 4*3 + 8*2 = 28 > 16 frames
    with pytest.raises(ValueError, match="has the 28 frames a tuple of 3 4-frame clips 8 apart needs"):
        run_training(cfg, role="pretrain", experiment="short", objective=build_objective(cfg, labels=False),
                     workdir=tmp_path, progress=False)
    client = MlflowClient(local_tracking)
    exp = client.get_experiment_by_name("short")
    assert exp is None or not client.search_runs([exp.experiment_id])  # refused before any run began


@pytest.mark.slow
def test_evaluate_refuses_a_label_free_encoders_accuracy_and_scores_its_retrieval_and_probe(local_tracking, pcl_set,
                                                                                           tmp_path):
    # One epoch of label-free pretraining makes a real encoder whose classifier never saw a label.
    from kdhar.evaluation import evaluate_model

    cfg = pcl_config(pcl_set, epochs=1)
    pre = run_training(cfg, role="pretrain", experiment="pcl-eval", objective=build_objective(cfg, labels=False),
                       workdir=tmp_path, progress=False, register=False)
    uri = f"runs:/{pre.run_id}"
    scoring = RunConfig(data=cfg.data, clip=cfg.clip, optim=cfg.optim)
    with pytest.raises(ValueError, match=rf"model {uri} is a label-free \(self-supervised\) encoder: its classifier "
                                         r"was never trained.*--retrieval or --probe.*kdhar finetune --model"):
        evaluate_model(uri, scoring, experiment="pcl-eval")
    client = MlflowClient(local_tracking)
    exp = client.get_experiment_by_name("pcl-eval").experiment_id
    assert not client.search_runs([exp], "tags.role = 'evaluation'")  # refused before an evaluation run began

    # Its features are what it learned: --retrieval scores them, and nothing of the untrained head.
    metrics = evaluate_model(uri, scoring, experiment="pcl-eval", retrieval=True)
    assert "retrieval_top1" in metrics and not any(k.startswith(("test_", "probe_")) for k in metrics)
    [evaluation] = client.search_runs([exp], "tags.role = 'evaluation'")
    assert set(evaluation.data.metrics) == set(metrics)

    # --probe fits a linear classifier on the frozen features of every video of the training list
    # (the short one included) and scores the test videos with it.
    probed = evaluate_model(uri, scoring, experiment="pcl-eval", probe=True)
    listed = len(load_index("ucf101", str(pcl_set), 1, "train").samples)
    assert probed["probe_train_videos"] == listed and 0.0 <= probed["probe_top1"] <= 1.0
    assert "probe_top5" not in probed  # 3 classes: every video would be a hit
    assert not any(k.startswith(("test_", "retrieval_")) for k in probed)
    run = next(r for r in client.search_runs([exp], "tags.role = 'evaluation'") if r.data.tags["scored"] == "probe")
    assert run.data.metrics["probe_top1"] == probed["probe_top1"] and run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_pcl_run_keeps_the_model_and_retrieval_of_each_stage(local_tracking, pcl_set, tmp_path):
    from kdhar import tracking
    from kdhar.distill import load_init
    from kdhar.evaluation import evaluate_model

    cfg = pcl_config(pcl_set, epochs=4)  # stages after epochs 1, 3 and 4
    pre = run_training(cfg, role="pretrain", experiment="pcl-stages", objective=build_objective(cfg, labels=False),
                       workdir=tmp_path, progress=False, register=False)
    run = MlflowClient(local_tracking).get_run(pre.run_id)
    tags, m = run.data.tags, run.data.metrics
    # Early and mid are models of their own beside the run's; late is the run's model (its last epoch).
    assert tags["stage_model_early"].startswith("models:/") and tags["stage_model_mid"].startswith("models:/")
    assert tags["stage_model_late"] == tags[tracking.MODEL_URI_TAG] == pre.model_uri
    assert len({tags[f"stage_model_{s}"] for s in ("early", "mid", "late")}) == 3
    assert tracking.resolve_model_uri(f"runs:/{pre.run_id}") == pre.model_uri  # the run's model is still the last
    early, last = load_init(f"runs:/{pre.run_id}/model-early"), load_init(f"runs:/{pre.run_id}")
    assert early.keys() == last.keys() and any(not torch.equal(early[k], last[k]) for k in early)
    assert load_init(f"runs:/{pre.run_id}/model-mid").keys() == last.keys()
    # Retrieval is logged at each stage's epoch; the late one is the final retrieval.
    history = {s: [(h.step, h.value) for h in MlflowClient(local_tracking).get_metric_history(pre.run_id, f"retrieval_top1_{s}")]
               for s in ("early", "mid", "late")}
    assert [h[0][0] for h in history.values()] == [1, 3, 4]
    assert m["retrieval_top1_late"] == m["retrieval_top1"] and m["retrieval_top5_late"] == m["retrieval_top5"]
    # The early model, scored by `kdhar evaluate --model runs:/<run>/model-early`, retrieves as logged at epoch 1.
    scored = evaluate_model(f"runs:/{pre.run_id}/model-early", cfg, experiment="pcl-stages", retrieval=True)
    assert {k: scored[k] for k in ("retrieval_top1", "retrieval_top5")} == {
        "retrieval_top1": m["retrieval_top1_early"], "retrieval_top5": m["retrieval_top5_early"]}

@pytest.mark.slow
def test_a_pcl_model_fine_tunes_as_pcls_code_by_default_and_plain_when_told(local_tracking, pcl_set, tmp_path,
                                                                           kdhar_cli):
    from kdhar.checkpoint import load_checkpoint
    from kdhar.experiments import DatasetSpec, build_run_config
    from kdhar.finetune import finetune

    cfg = pcl_config(pcl_set, epochs=1)
    pre = run_training(cfg, role="pretrain", experiment="pcl-ft", objective=build_objective(cfg, labels=False),
                       workdir=tmp_path, progress=False, register=False)
    hmdb = tmp_path / "hmdb51"
    generate(hmdb, "hmdb51", SynthSpec(num_classes=3, groups=6, clips_per_group=2, frames=16, size=(48, 64), seed=6))
    common = ["--dataset", "hmdb51", "--root", str(hmdb), "--epochs", "2", "--val-fraction", "0.3", "--test-clips", "1",
              "--batch-size", "8", "--num-workers", "0", "--threads", "1", "--experiment", "pcl-ft"]
    done = kdhar_cli("finetune", "--model", f"runs:/{pre.run_id}", *common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(local_tracking)
    [ft] = client.search_runs([client.get_experiment_by_name("pcl-ft").experiment_id], "tags.role = 'finetune'")
    p, m = ft.data.params, ft.data.metrics
    # PCL's ft_classify.py: lr x0.1 on a validation-loss plateau, no warm-up, no colour augmentation,
    # and the test accuracy of the epoch of lowest validation loss, the weights best.pt keeps.
    assert (p["finetune.protocol"], ft.data.tags["finetune_protocol"]) == ("pcl", "pcl")
    assert (p["optim.schedule"], p["optim.plateau_patience"], p["optim.warmup"], p["clip.augment"]) == (
        "plateau", "2", "0.0", "False")
    assert {"plateau_scale", "sel_acc_late", "sel_epoch_late", "val_loss"} <= set(m)
    history = client.get_metric_history(ft.info.run_id, "val_loss")
    lowest = min(history, key=lambda h: (h.value, h.step))
    assert m["sel_epoch_late"] == lowest.step
    best = load_checkpoint(tmp_path / "runs" / "checkpoints" / ft.info.run_id / "best.pt")
    assert best["epoch"] == lowest.step and best["val_loss"] == pytest.approx(lowest.value)

    # Told plain, it trains as any supervised run of its size and selects by validation accuracy.
    plain_cfg = build_run_config("tiny3d", size="cpu", dataset=DatasetSpec("hmdb51", str(hmdb)), fraction=1.0, seed=0,
                                 overrides={"epochs": 2, "val_fraction": 0.3, "test_clips": 1, "batch_size": 8,
                                            "num_workers": 0, "threads": 1, "finetune_protocol": "plain"})
    plain = finetune(f"runs:/{pre.run_id}", plain_cfg, experiment="pcl-ft", progress=False)
    run = client.get_run(plain.run_id)
    assert "finetune.protocol" not in run.data.params and run.data.tags["finetune_protocol"] == "plain"
    assert run.data.params["optim.schedule"] == "cosine" and "sel_acc_late" not in run.data.metrics
