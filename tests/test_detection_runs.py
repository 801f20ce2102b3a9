"""Detection runs through the run machinery: their configuration and presets, the splits, the engine's
accuracy over positive steps, the detection grids, the report's detection table, and one tiny
teacher -> GKD student -> evaluate chain through the command line with every metric in MLflow."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from kdhar import config as C
from kdhar.data import untrimmed
from kdhar.data.splits import load_splits
from kdhar.detection_report import BASELINES, detection_rows, format_detection
from kdhar.engine import train_step
from kdhar.experiments import DatasetSpec, SpecError, build_run_config, load_spec, plan
from kdhar.models.detector import build_detector
from kdhar.objectives.detection import DetectionStep

ROOT = Path(__file__).resolve().parents[1]
SPEC = untrimmed.UntrimmedSpec(num_classes=3, groups=4, videos_per_group=2, frames=(64, 80), segments=(1, 2),
                               segment_frames=(16, 24), ambiguous=0.5, size=(48, 64), seed=3)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 validation (training) and 4 test videos of 64-80 frames, 3 classes."""
    root = tmp_path_factory.mktemp("tad") / "thumos14"
    untrimmed.generate(root, SPEC)
    return root


def det_config(root: Path | str = "data/synthetic/thumos14", size: str = "cpu", fraction: float = 1.0, **overrides):
    return build_run_config("tiny3d", size=size, overrides=overrides, dataset=DatasetSpec("thumos14", str(root)),
                            fraction=fraction, seed=0, task="detection")


# ---------------------------------------------------------------- configuration


def test_recognition_runs_keep_their_parameters():
    cfg = build_run_config("c3d", size="cpu", overrides={}, dataset=DatasetSpec("ucf101", "x"), fraction=1.0, seed=0)
    params = cfg.params()
    assert cfg.task == "recognition"
    assert not [k for k in params if k == "task" or k.startswith(("window.", "det."))]


def test_detection_presets_at_cpu_and_paper_size():
    cpu = det_config(frame_interval=3)
    assert (cpu.window.length, cpu.window.frame_interval, cpu.window.train_stride, cpu.window.test_stride) == (128, 3, 64, 128)
    assert cpu.clip.frame_interval == 4  # frame_interval is the window's in a detection run
    assert (cpu.clip.crop, cpu.det.optimizer, cpu.optim.lr, cpu.gkd.beta) == (48, "adam", 1e-3, 10.0)
    paper = det_config(size="paper")
    w, o = paper.window, paper.optim
    assert (w.length, w.train_stride, w.test_stride, w.frame_interval) == (256, 30, 128, 1)
    assert (paper.clip.crop, paper.clip.resize) == (96, (112, 112))
    assert (o.lr, o.weight_decay, o.batch_size, o.epochs, o.schedule, o.warmup) == (1e-6, 1e-3, 1, 50, "constant", 0.0)
    assert paper.det.optimizer == "adam" and paper.gkd.beta == 10.0
    params = paper.params(kd=False)
    assert params["task"] == "detection" and params["window.length"] == 256 and "det.bg_weight" not in params
    assert det_config(attention=True).params(kd=False)["det.bg_weight"] == 35.0


@pytest.mark.parametrize(("overrides", "named"), [
    ({"train_stride": 1000}, "train_stride=1000"),
    ({"nms": "fuzzy"}, "nms='fuzzy'"),
    ({"bg_weight": -1.0}, "bg_weight=-1.0"),
    ({"kd": "gkd+logit"}, "kd='gkd+logit'"),
])
def test_a_bad_detection_knob_is_refused_naming_it(overrides, named):
    with pytest.raises(SpecError, match=re.escape(named)):
        det_config(**overrides)


def test_the_detection_grids_plan_teacher_scratch_attention_score_kd_and_gkd_over_paired_seeds():
    for name, size in (("tad-cpu", "cpu"), ("tad-paper", "paper")):
        spec = load_spec(ROOT / "experiments" / f"{name}.yaml")
        cells = plan(spec)
        assert spec.task == "detection" and spec.size == size and len(spec.seeds) >= 5
        # Enough seeds that a method whose every pair differs one way can pass Holm: the exact sign-flip
        # p of n pairs is at least 2 / 2^n, and the report corrects over 4 comparisons x 2 readings.
        family = 2 * sum(len(b) for b in BASELINES.values())
        assert family == 8 and family * 2 / 2 ** len(spec.seeds) < 0.05, name
        [teacher] = [c for c in cells if c.role == "teacher"]
        assert teacher.cfg.task == "detection" and teacher.cfg.gkd.attention  # GKD needs an attention teacher
        kinds = {(c.teacher != "none", c.cfg.gkd.attention, c.cfg.gkd.method) for c in cells if c.role == "student"}
        assert kinds == {(False, False, "logit"), (False, True, "logit"), (True, False, "logit"), (True, True, "gkd")}
        students = [c for c in cells if c.role == "student"]
        assert len(students) == 4 * len(spec.seeds) and all(c.cfg.task == "detection" for c in students)
        assert {c.cfg.det.optimizer for c in cells} == {"adam"}  # every method, one optimiser
    # A teacher may train under its own background weight (a loss weight, not how clips are cut): the
    # CPU teacher's x1, while its students keep GKD's x35.
    cells = plan(load_spec(ROOT / "experiments" / "tad-cpu.yaml"))
    assert {(c.role, c.cfg.det.bg_weight) for c in cells} == {("teacher", 1.0), ("student", 35.0)}


@pytest.mark.parametrize(("extra", "message"), [
    ({"dataset": {"name": "ucf101", "root": "x"}}, "give dataset {name: thumos14"),
    ({"kd": ["gkd+logit"]}, "gkd+logit is recognition's"),
    ({"ssl": "pcl"}, "takes none of ssl"),
])
def test_a_detection_spec_that_cannot_run_is_one_line(extra, message):
    from kdhar.experiments import parse_spec

    raw = {"experiment": "x", "task": "detection", "dataset": {"name": "thumos14", "root": "x"}, "teachers": ["c3d"],
           "students": ["tiny3d"], "fractions": [1.0], "seeds": [0], **extra}
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(raw, source="spec.yaml")


# ---------------------------------------------------------------- data and engine


def test_detection_splits_hold_validation_videos_out_and_nest_fractions(tiny_set):
    full = load_splits(det_config(tiny_set, val_fraction=0.25))
    half = load_splits(det_config(tiny_set, val_fraction=0.25, fraction=0.5))
    names = lambda part: {v.name for v in part.videos}  # noqa: E731
    assert len(full.val.videos) == 1 and len(full.train.videos) == 3 and len(full.test.videos) == 4
    assert not names(full.val) & names(full.train) and names(half.val) == names(full.val)
    assert names(half.train) < names(full.train) and len(half.train.videos) == 2
    assert full.classes == ["SitDown", "SlideLeft", "StandUp"] and len(full.fingerprint) == 12


def test_the_training_accuracy_of_a_detector_counts_its_positive_steps():
    torch.manual_seed(0)
    step = DetectionStep(build_detector("tiny3d", num_classes=2, width=2, head_channels=8))
    batch = dict(clip=torch.rand(2, 3, 16, 32, 32), segments=[torch.tensor([[2.0, 10.0]]), torch.tensor([[6.0, 10.0]])],
                 labels=[torch.tensor([1]), torch.tensor([0])], ambiguous=[torch.zeros(0, 2)] * 2,
                 valid_steps=torch.tensor([16, 16]), video=torch.tensor([0, 1]), start=torch.tensor([0, 0]),
                 index=torch.tensor([0, 1]))
    opt = torch.optim.SGD(step.parameters(), lr=0.0)
    result = train_step(step, batch, opt, "cpu")
    # Head stride 2: centres 3, 5, 7, 9 in the first window, 7 and 9 in the second.
    assert result["clips"] == 2 and result["scored"] == 6 and 0 <= int(result["correct"]) <= 6


# ---------------------------------------------------------------- the report's detection table


def run(method: str, seed: int, final: float, teacher: str = "none") -> dict:
    tags = {"task": "detection", "method": method, "student_arch": "tiny3d", "teacher_arch": teacher, "seed": str(seed),
            "fraction": "1.0", "dataset": "thumos14", **({"teacher_run_id": "t" * 32} if teacher != "none" else {})}
    return {"run_id": f"{method}-{seed}", "status": "FINISHED", "tags": tags,
            "metrics": {"final_test_map_avg": final, "final_test_gkd_map_avg": final + 0.1, "final_test_map_0.5": final}}


def test_the_detection_table_pairs_each_method_with_scratch_by_seed_and_gkd_with_its_attention_twin():
    scratch = [0.20, 0.22, 0.18, 0.25, 0.21]
    runs = [run("det-supervised", s, v) for s, v in enumerate(scratch)]
    runs += [run("det-attention", s, v + 0.01 * (-1) ** s) for s, v in enumerate(scratch)]
    runs += [run("det-kd-logit", s, v + 0.03, "c3d") for s, v in enumerate(scratch)]
    runs += [run("det-gkd", s, v + 0.05 + 0.01 * s, "c3d") for s, v in enumerate(scratch)]
    runs.append(run("det-supervised", 0, 0.99) | {"status": "FAILED"})
    # The teacher the students name gets a row; a teacher no student names does not.
    teacher = {"run_id": "t" * 32, "tags": {"task": "detection", "role": "teacher", "arch": "c3d", "seed": "0"},
               "metrics": {"final_test_map_avg": 0.4, "final_test_gkd_map_avg": 0.5}}
    other = teacher | {"run_id": "u" * 32}
    rows = detection_rows(runs, margin=0.05, teachers=[teacher, other])
    assert [r.method for r in rows] == ["det-teacher", "det-supervised", "det-attention", "det-kd-logit", "det-gkd"]
    teacher_row, scratch_row, attention, kd, gkd = rows
    assert teacher_row.label == "teacher c3d (tttttttt)" and not teacher_row.tests
    assert teacher_row.stat("final_test_map_avg")[0::2] == (0.4, 1)  # its mean over its one run
    assert scratch_row.stat("final_test_map_avg")[0] == pytest.approx(sum(scratch) / 5) and not scratch_row.tests
    # Each comparison on both readings: THUMOS14's toolkit (map_avg) and GKD's code (gkd_map_avg).
    assert set(gkd.tests) == {(b, r) for b in ("det-supervised", "det-attention") for r in ("map_avg", "gkd_map_avg")}
    assert set(kd.tests) == {("det-supervised", "map_avg"), ("det-supervised", "gkd_map_avg")}
    t = gkd.tests[("det-supervised", "map_avg")]
    assert t.n == 5 and t.mean == pytest.approx(0.07) and t.low < 0.07 < t.high
    assert gkd.tests[("det-supervised", "gkd_map_avg")].mean == pytest.approx(0.07)  # the fixture's gkd reading is map + 0.1
    assert t.p_perm == pytest.approx(2 / 32)  # all five differences positive: 2 of the 32 sign flips are as extreme
    # One Holm family of 8 comparisons (4 pairs x 2 readings): the six all-positive ones have the smallest p.
    family = [x for r in (attention, kd, gkd) for x in r.tests.values()]
    assert len(family) == 8
    assert sorted(x.p_holm for x in family)[0] == pytest.approx(min(1.0, 8 * 2 / 32))
    assert all(x.verdict for x in family)
    text = format_detection(rows, 0.05)
    assert "Detection: student tiny3d on thumos14" in text and "GKD <- c3d (tttttttt)" in text
    assert "+7.0 [" in text and "scratch + attention" in text and "teacher c3d (tttttttt)" in text
    assert "gkd_map_avg" in text and "40.0" in text


# ---------------------------------------------------------------- the command line, end to end


@pytest.mark.slow
def test_detect_teacher_then_gkd_student_then_evaluate_through_the_cli(local_tracking, tiny_set, capsys):
    from mlflow import MlflowClient

    from kdhar.cli import cli
    from kdhar.report import build_report

    common = ["--root", str(tiny_set), "--window-length", "16", "--frame-interval", "4", "--train-stride", "16",
              "--test-stride", "32", "--crop", "32", "--width", "2", "--head-channels", "8", "--batch-size", "2",
              "--epochs", "2", "--num-workers", "0", "--threads", "1", "--experiment", "det"]

    def kdhar(*args: str) -> None:
        cli.main([*args], standalone_mode=False)

    # Without a teacher with the attention module, GKD is refused before any run begins.
    with pytest.raises(ValueError, match="train one first: kdhar detect train-teacher --arch c3d --attention true"):
        kdhar("detect", "distill", "--teacher", "c3d", "--kd", "gkd", *common)
    kdhar("detect", "train-teacher", "--arch", "c3d", "--attention", "true", *common)
    kdhar("detect", "distill", "--teacher", "c3d", "--student", "tiny3d", "--kd", "gkd", *common)
    client = MlflowClient(local_tracking)
    exp = client.get_experiment_by_name("det").experiment_id
    [teacher] = client.search_runs([exp], "tags.role = 'teacher'")
    [student] = client.search_runs([exp], "tags.role = 'student'")
    assert teacher.info.run_name == "det-teacher-att-c3d-s0" and student.info.run_name == "det-gkd-c3d→tiny3d-f1-s0"
    assert [v.run_id for v in client.search_model_versions("name = 'kdhar-det-teacher-attention-c3d'")] == [teacher.info.run_id]
    assert [v.run_id for v in client.search_model_versions("name = 'kdhar-det-gkd-tiny3d'")] == [student.info.run_id]
    assert student.data.tags["method"] == "det-gkd" and student.data.tags["teacher_run_id"] == teacher.info.run_id
    metrics, params = student.data.metrics, student.data.params
    assert params["task"] == "detection" and params["gkd.beta"] == "10.0" and params["det.bg_weight"] == "35.0"
    for term in ("cls_loss", "reg_loss", "bg_loss", "rec_loss", "ad_loss", "align_loss", "cvae_recon_loss",
                 "cvae_kl_loss", "cvae_gd_loss"):
        history = client.get_metric_history(student.info.run_id, f"train_{term}")
        assert sorted(m.step for m in history) == [1, 2] and all(math.isfinite(m.value) for m in history), term
    tious = ["0.3", "0.4", "0.5", "0.6", "0.7"]
    for key in ([f"final_test_map_{t}" for t in tious] + [f"final_test_gkd_map_{t}" for t in ("0.1", "0.2", "0.3")]
                + ["final_test_map_avg", "final_test_gkd_map_avg", "map_early", "map_late", "test_map_avg"]):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert any(k.startswith("final_test_ap_0.5_") for k in metrics)  # per-class AP
    artifacts = {a.path for a in client.list_artifacts(student.info.run_id)}
    assert {"timelines.png", "per_class_ap.json", "learning_curves.png", "detector"} <= artifacts
    assert [a.path for a in client.list_artifacts(student.info.run_id, "detector")] == ["detector/state.pt"]

    # The logged detector scores on the test videos exactly as the run's last evaluation did.
    capsys.readouterr()
    kdhar("detect", "evaluate", "--model", f"runs:/{student.info.run_id}", "--root", str(tiny_set),
          "--num-workers", "0", "--threads", "1", "--experiment", "det")
    shown = dict(item.split("=") for item in capsys.readouterr().out.strip().splitlines()[-1].split(", "))
    for key in ("map_avg", "map_0.5", "gkd_map_avg"):
        assert float(shown[f"test_{key}"]) == pytest.approx(metrics[f"final_test_{key}"], abs=5e-5), key  # printed to 4 places
    [evaluation] = client.search_runs([exp], "tags.role = 'evaluation'")
    for key in ("map_avg", "gkd_map_avg", "ap_0.5_SitDown"):
        assert evaluation.data.metrics[f"test_{key}"] == pytest.approx(metrics[f"final_test_{key}"], abs=1e-9), key
    with pytest.raises(ValueError, match="score it with `kdhar detect evaluate"):  # not a classifier
        kdhar("evaluate", "--model", f"runs:/{student.info.run_id}", "--root", str(tiny_set), "--experiment", "det")
    report = build_report("det", Path(local_tracking.removeprefix("sqlite:///")).parent / "reports")
    assert "Detection: student tiny3d on thumos14" in report.text
    assert f"teacher c3d ({teacher.info.run_id[:8]})" in report.text  # found among the experiment's teacher runs



@pytest.mark.slow
def test_an_attention_teacher_starts_from_a_plain_detection_teachers_logged_weights(local_tracking, tiny_set):
    """GKD's teacher phase on a trained detector: `--init runs:/<plain teacher>` fills the trunk and
    head (the logged graph keeps them under `detector.`), and only the attention module and CVAEs
    start from random weights."""
    from mlflow import MlflowClient

    from kdhar.cli import cli
    from kdhar.distill import load_init
    from kdhar.tracking import load_model

    common = ["--root", str(tiny_set), "--window-length", "16", "--frame-interval", "4", "--train-stride", "16",
              "--test-stride", "32", "--crop", "32", "--width", "2", "--head-channels", "8", "--batch-size", "2",
              "--epochs", "1", "--num-workers", "0", "--threads", "1", "--experiment", "det-init"]
    cli.main(["detect", "train-teacher", "--arch", "c3d", *common], standalone_mode=False)
    client = MlflowClient(local_tracking)
    exp = client.get_experiment_by_name("det-init").experiment_id
    [plain] = client.search_runs([exp], "tags.role = 'teacher'")
    init = f"runs:/{plain.info.run_id}"
    plain_state = load_init(init)
    assert plain_state and not any(k.startswith(("graph.", "detector.")) for k in plain_state)

    # An lr of 1e-12 leaves every loaded weight where the plain teacher left it (Adam steps by about lr).
    cli.main(["detect", "train-teacher", "--arch", "c3d", "--attention", "true", "--init", init, "--lr", "1e-12",
              *common], standalone_mode=False)
    [attention] = client.search_runs([exp], f"tags.role = 'teacher' and params.init = '{init}'")
    trained = load_init(f"runs:/{attention.info.run_id}")
    assert len(trained) > len(plain_state)  # the attention module's weights besides the plain ones
    weights = [k for k in plain_state if k.endswith(".weight") and plain_state[k].dim() > 1]  # convolutions, linear
    assert {k.split(".")[0] for k in weights} >= {"backbone", "cls", "reg"}  # the trunk and the 1-D head
    assert all(torch.allclose(trained[k], plain_state[k], atol=1e-8) for k in weights)
