"""GKD as a training method (../shared/methods/gkd.md, sections 2, 3b and 8): which pass trains what,
generative distillation's target (the teacher's CVAE on the *student's* feature), adapters for every
registry pair, the net pass's loss and its ramp, and teacher -> student runs end to end through the CLI.
The building blocks alone are in test_gkd.py."""

from __future__ import annotations

import itertools
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from kdhar.config import GKDConfig
from kdhar.data.synthetic import SynthSpec, generate
from kdhar.models import MODELS, build_model
from kdhar.objectives.gkd import GKDStep, attend, build_gkd_net, cvae_loss, feature_shape, ramp_share
from kdhar.objectives.kd import LogitKD, kd_term

CLIP = (8, 56)  # (frames, crop): the CPU preset's clips
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gkd_parts(arch: str, width: int, seed: int, variant: str = "faithful"):
    """A GKD network and its CVAE for `arch` at `width`, sized for CLIP."""
    torch.manual_seed(seed)
    return build_gkd_net(build_model(arch, 10, width=width), *CLIP, variant, "sample")


def make_step(student=("tiny3d", 4), teacher=("c3d", 8), epochs: int = 2, kd: bool = False, **cfg) -> GKDStep:
    net, cvae = gkd_parts(*student, seed=0)
    parts = gkd_parts(*teacher, seed=1) if teacher is not None else (None, None)
    term = LogitKD(parts[0], tau=4.0, weighting="mix", alpha=0.25) if kd else None
    config = GKDConfig(method="gkd+logit" if kd else "gkd", attention=True, **cfg)
    return GKDStep(net, cvae, config, epochs, CLIP, *parts, kd=term)


def batch(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, *CLIP[:1], CLIP[1], CLIP[1], generator=g), torch.tensor([1, 7, 3, 0][:b])


def snapshot(module: torch.nn.Module, bn_stats: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (BatchNorm running statistics only when `bn_stats`)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if bn_stats or not k.endswith(BN_STATS)}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def student_side(step: GKDStep) -> dict[str, torch.nn.Module]:
    """What the net pass trains: the student network and the adapters."""
    return {"model": step.model, "adapter": step.adapter, "attention_adapter": step.attention_adapter}


# ---------------------------------------------------------------- the two passes


def test_stage_a_trains_only_the_cvae_and_stage_b_only_the_network():
    step = make_step().train()
    x, y = batch()
    teacher_before = {**snapshot(step.teacher, bn_stats=True),
                      **{f"cvae.{k}": v for k, v in snapshot(step.teacher_cvae).items()}}
    nets = {name: snapshot(m) for name, m in student_side(step).items()}
    bn_before = {k: v for k, v in snapshot(step.model, bn_stats=True).items() if k.endswith(("running_mean", "running_var"))}
    assert bn_before, "the tiny trunk has BatchNorm"
    cvae_before = snapshot(step.cvae)

    # Stage A: the CVAE's own optimiser, over exactly the CVAE's parameters.
    step.set_pass("cvae")
    opt = step.pass_optimizer("cvae")
    stepped = {id(p) for group in opt.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in step.cvae.parameters()}
    out = step(x, y)
    assert {"loss", "recon_loss", "kl_loss", "gd_loss", "output"} <= set(out)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    for name, module in student_side(step).items():
        assert not changed(nets[name], snapshot(module)), f"stage A changed the student's {name}"
        assert all(p.grad is None for p in module.parameters()), f"stage A put gradients on the {name}"
    assert changed(cvae_before, snapshot(step.cvae)), "stage A left the CVAE as it was"
    # The frozen network still runs in train mode, so its BatchNorm statistics move (section 3b).
    bn_after = {k: v for k, v in snapshot(step.model, bn_stats=True).items() if k in bn_before}
    assert changed(bn_before, bn_after)

    # Stage B: SGD over the net pass's parameters (the network and the adapters, not the CVAE).
    step.set_pass("net")
    params = step.pass_parameters("net")
    cvae_ids = {id(p) for p in step.cvae.parameters()}
    assert params and not any(id(p) in cvae_ids for p in params)
    assert {id(p) for p in params} | cvae_ids == {id(p) for p in step.parameters()}
    cvae_mid = snapshot(step.cvae)
    opt.zero_grad(set_to_none=True)  # stage A's gradients, so that any on the CVAE below are stage B's
    nets = {name: snapshot(m) for name, m in student_side(step).items()}
    sgd = torch.optim.SGD(params, lr=0.1)
    out = step(x, y)
    assert {"loss", "task_loss", "rec_loss", "ad_loss", "align_loss", "output"} <= set(out)
    sgd.zero_grad()
    out["loss"].backward()
    sgd.step()
    assert not changed(cvae_mid, snapshot(step.cvae)), "stage B changed the CVAE"
    assert all(p.grad is None for p in step.cvae.parameters())
    moved = {name: changed(nets[name], snapshot(m)) for name, m in student_side(step).items()}
    assert all(moved.values()), f"stage B left some of the student side unchanged: {moved}"
    moved_model = moved["model"]
    for part in ("backbone.", "attention.", "head."):  # trunk, attention head and classifier all learn
        assert any(k.startswith(part) for k in moved_model), part

    teacher_after = {**snapshot(step.teacher, bn_stats=True),
                     **{f"cvae.{k}": v for k, v in snapshot(step.teacher_cvae).items()}}
    assert not changed(teacher_before, teacher_after), "the frozen teacher moved"
    assert not any(k.startswith(("teacher", "kd.")) for k in step.state_dict())  # not saved with the student


def test_generative_distillation_runs_the_teacher_cvae_on_the_students_adapted_feature():
    step = make_step().train()  # tiny3d (16, 2, 7, 7) student, c3d (64, 1, 4, 4) teacher: both adapters act
    assert step.adapter.needed
    x, y = batch()
    seen: dict[str, list] = {"teacher": [], "student": []}

    def capture(name):
        def hook(_module, args, output):
            seen[name].append(([a.detach().clone() for a in args], [o.detach().clone() for o in output]))
        return hook

    step.teacher_cvae.register_forward_hook(capture("teacher"))
    step.cvae.register_forward_hook(capture("student"))
    step.set_pass("cvae")
    torch.manual_seed(5)
    out = step(x, y)
    [((t_feature, t_attention), (t_mu, t_logvar, t_z, t_regen))] = seen["teacher"]  # forward mode, once
    [((s_feature, s_attention), (s_mu, s_logvar, _s_z, s_regen))] = seen["student"]

    # Independently: the student's feature and attention on the same clips (train mode, as the pass).
    with torch.no_grad():
        feature = step.model.forward_features(x)
        attention = step.model.attention(feature)
        assert torch.allclose(s_feature, feature) and torch.allclose(s_attention, attention)
        assert torch.allclose(t_feature, step.adapter(feature), atol=1e-6)
        assert torch.allclose(t_attention, step.attention_adapter(attention), atol=1e-6)
        # ... and not the teacher's own feature and attention (the dev variant's target).
        own = step.teacher.forward_features(x)
        assert own.shape == t_feature.shape and not torch.allclose(own, t_feature, atol=1e-3)
        assert not torch.allclose(step.teacher.attention(own), t_attention, atol=1e-3)
        # Forward mode: encoded from that feature and decoded with that attention.
        mu, logvar = step.teacher_cvae.encode(t_feature, t_attention)
        assert torch.allclose(mu, t_mu, atol=1e-6) and torch.allclose(logvar, t_logvar, atol=1e-6)
        assert torch.allclose(step.teacher_cvae.decode(t_z, t_attention), t_regen, atol=1e-6)
        gd = F.mse_loss(step.adapter(s_regen), t_regen)
    assert out["gd_loss"].item() == pytest.approx(gd.item(), rel=1e-5)
    assert out["gd_loss"].item() > 0
    vae = cvae_loss(feature, s_regen, s_mu, s_logvar, attention)
    assert out["loss"].item() == pytest.approx((vae["loss"] + 0.01 * gd).item(), rel=1e-5)

    # With the same noise the whole pass repeats, and its GD term is the recomputed one.
    seen["teacher"].clear()
    torch.manual_seed(5)
    again = step(x, y)
    assert again["gd_loss"].item() == pytest.approx(out["gd_loss"].item(), rel=1e-6)
    assert torch.allclose(seen["teacher"][0][1][3], t_regen)


@pytest.mark.parametrize("widths", [(4, 4), (8, 8), (8, 4)], ids=["w4", "w8", "w8-teaches-w4"])
def test_adapters_align_every_ordered_registry_pair(widths):
    t_width, s_width = widths
    parts = {(arch, w): gkd_parts(arch, w, seed=i) for i, arch in enumerate(MODELS) for w in set(widths)}
    x, y = batch()
    for teacher, student in itertools.product(MODELS, repeat=2):
        if teacher == student and t_width == s_width:
            continue  # the same network twice
        t_net, t_cvae = parts[teacher, t_width]
        s_net, s_cvae = parts[student, s_width]
        step = GKDStep(s_net, s_cvae, GKDConfig(method="gkd", attention=True), 2, CLIP, t_net, t_cvae).train()
        target, own = feature_shape(t_net, *CLIP), feature_shape(s_net, *CLIP)
        assert step.adapter.needed == (target != own), (teacher, student)
        seen = []
        handle = t_cvae.register_forward_hook(lambda _m, args, _o: seen.append(tuple(a.shape for a in args)))
        try:
            step.set_pass("cvae")
            a = step(x, y)
            step.set_pass("net")
            b = step(x, y)
        finally:
            handle.remove()
        pair = f"{teacher} (w{t_width}) -> {student} (w{s_width})"
        assert seen == [((2, *target), (2, *target[:2]))], pair  # the adapted feature and attention
        assert torch.isfinite(a["gd_loss"]) and torch.isfinite(b["ad_loss"]) and torch.isfinite(b["loss"]), pair
        assert ("align_loss" in b) == step.adapter.needed, pair
        with torch.no_grad():
            feature = s_net.forward_features(x)
            assert tuple(step.adapter(feature).shape[1:]) == target, pair
            assert tuple(step.attention_adapter(s_net.attention(feature)).shape[1:]) == target[:2], pair


def test_net_pass_loss_is_task_plus_beta_ad_plus_align_plus_the_ramped_regeneration():
    epochs, share = 10, 0.3  # the ramp lasts R = 3 epochs
    step = make_step(epochs=epochs, beta=0.3, rec_weight=0.7, ramp=share).eval()  # no dropout: terms recomputable
    ramp_len = share * epochs
    x, y = batch()
    step.set_pass("net")
    losses = {}
    for epoch in (1, 2, 6):  # 0-based, as run_training calls set_epoch; in eval no step moves the ramp
        step.set_epoch(epoch)
        ramp = min(epoch, ramp_len) / ramp_len
        torch.manual_seed(11)
        out = step(x, y)
        want = out["task_loss"] + 0.3 * out["ad_loss"] + out["align_loss"] + ramp * 0.7 * out["rec_loss"]
        assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6), epoch
        losses[epoch] = out["loss"].item()
        # Each term recomputed independently.
        torch.manual_seed(11)
        with torch.no_grad():
            feature = step.model.forward_features(x)
            attention, attended = step.model.attended(feature)
            logits = step.model.head(attended)
            rec = F.mse_loss(step.cvae.inference(attention), feature)
            t_feature = step.teacher.forward_features(x)
            t_attention = step.teacher.attention(t_feature)
        assert out["task_loss"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert out["rec_loss"].item() == pytest.approx(rec.item(), rel=1e-5)
        assert out["ad_loss"].item() == pytest.approx(F.mse_loss(step.attention_adapter(attention), t_attention).item(), rel=1e-5)
        assert out["align_loss"].item() == pytest.approx(F.mse_loss(step.adapter(feature), t_feature).item(), rel=1e-5)
    assert losses[1] < losses[2] < losses[6]  # the same terms, a growing regeneration weight
    assert step.ramp == 1.0

    # gkd+logit, with a teacher of the student's shape: no adapter, and the KD term's weighted CE
    # (0.75 x CE at alpha 0.25) plus its soft term replace the plain CE.
    step = make_step(student=("r3d_18", 4), teacher=("c3d", 4), epochs=epochs, kd=True, ramp=share).eval()
    assert not step.adapter.needed
    step.set_pass("net")
    for epoch in (1, 4):
        step.set_epoch(epoch)
        ramp = min(epoch, ramp_len) / ramp_len
        out = step(x, y)
        assert "align_loss" not in out
        with torch.no_grad():
            t_logits = step.teacher(x)
        soft = kd_term(out["output"], t_logits, 4.0)
        assert out["kd_loss"].item() == pytest.approx(soft.item(), rel=1e-5) and soft.item() > 0
        ce = F.cross_entropy(out["output"], y)
        assert out["task_loss"].item() == pytest.approx(ce.item(), rel=1e-5)
        want = 0.75 * ce + 0.25 * soft + 0.1 * out["ad_loss"] + ramp * 0.5 * out["rec_loss"]
        assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6), epoch


# ---------------------------------------------------------------- runs through the CLI


@pytest.fixture(scope="module")
def gkd_set(tmp_path_factory) -> Path:
    """3 classes x 10 groups x 2 clips of 12 frames at 64x80, where the CPU preset's 56-pixel crop fits:
    42 training videos (6 held out), 18 test ones."""
    root = tmp_path_factory.mktemp("gkd") / "ucf101"
    generate(root, "ucf101", SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=12, size=(64, 80), seed=5))
    return root


def tiny_options(root: Path) -> list[str]:
    return ["--root", str(root), "--fraction", "0.25", "--clip-len", "8", "--frame-interval", "1", "--crop", "56",
            "--batch-size", "8", "--num-workers", "0", "--threads", "1", "--experiment", "gkd"]


def kdhar(cli, args: list[str], uri: str, cwd: Path) -> subprocess.CompletedProcess:
    """A kdhar command in this process (`cli`: the kdhar_cli fixture), on the store at `uri`."""
    return cli(*args, cwd=cwd, env={"MLFLOW_TRACKING_URI": uri})


def metric_steps(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_attention_teacher_then_gkd_student_end_to_end(local_tracking, gkd_set, tmp_path, kdhar_cli):
    client = MlflowClient(local_tracking)
    common = tiny_options(gkd_set)
    done = kdhar(kdhar_cli, ["train-teacher", "--arch", "c3d", "--attention", "true", "--epochs", "2", "--width", "8", *common],
                 local_tracking, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [version] = client.search_model_versions("name = 'kdhar-teacher-attention-c3d'")
    teacher = client.get_run(version.run_id)
    assert teacher.info.status == "FINISHED" and teacher.data.tags["role"] == "teacher"
    assert teacher.data.tags["method"] == "attention"
    assert teacher.data.params["gkd.ramp"] == "1.0" and teacher.data.params["gkd.cvae_lr"] == "0.001"  # phase 1
    assert [a.path for a in client.list_artifacts(teacher.info.run_id, "gkd")] == ["gkd/state.pt"]
    for key in ("train_task_loss", "train_rec_loss", "train_cvae_recon_loss", "train_cvae_kl_loss"):
        assert sorted(metric_steps(client, teacher.info.run_id, key)) == [1, 2], key

    # The champion of kdhar-teacher-attention-c3d teaches a student of another architecture and width.
    done = kdhar(kdhar_cli, ["distill", "--teacher", "c3d", "--student", "r3d_18", "--width", "4", "--kd", "gkd", "--epochs", "2",
                  *common], local_tracking, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    exp = client.get_experiment_by_name("gkd").experiment_id
    [student] = client.search_runs([exp], "tags.role = 'student'")
    run_id = student.info.run_id
    assert student.info.status == "FINISHED"
    assert student.data.tags["method"] == "gkd" and student.data.tags["teacher_run_id"] == teacher.info.run_id
    params = student.data.params
    assert params["gkd.variant"] == "faithful" and params["gkd.beta"] == "0.1" and params["gkd.method"] == "gkd"
    assert params["gkd.adapter"] == "1x1x1 conv 32->64"  # r3d_18 at width 4 -> c3d at width 8
    for term in ("task_loss", "rec_loss", "ad_loss", "align_loss", "cvae_recon_loss", "cvae_kl_loss", "cvae_gd_loss"):
        history = metric_steps(client, run_id, f"train_{term}")
        assert sorted(history) == [1, 2] and all(math.isfinite(v) for v in history.values()), term
    assert "train_kd_loss" not in student.data.metrics
    assert [v.run_id for v in client.search_model_versions("name = 'kdhar-gkd-r3d_18'")] == [run_id]
    assert [a.path for a in client.list_artifacts(run_id, "gkd")] == ["gkd/state.pt"]  # it can teach in turn

    # The logged student is the attention network: it reloads and scores as it did at the end of training.
    scored = kdhar(kdhar_cli, ["evaluate", "--model", f"runs:/{run_id}", "--root", str(gkd_set), "--num-workers", "0",
                    "--threads", "1", "--experiment", "gkd"], local_tracking, tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    shown = dict(item.split("=") for item in scored.stdout.strip().splitlines()[-1].split(", "))
    final = student.data.metrics
    for key in ("video_top1", "clip_top1", "loss"):
        assert float(shown[f"test_{key}"]) == pytest.approx(final[f"final_test_{key}"], abs=1e-4), key

    from kdhar import tracking
    from kdhar.objectives.gkd import GKDNet, load_gkd_state

    net, _cvae = load_gkd_state(tracking.load_run_torch(run_id, "gkd/state.pt"))
    assert isinstance(net, GKDNet)
    logged = tracking.load_model(f"runs:/{run_id}", "cpu")
    clips = torch.rand(2, 3, 8, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(logged(clips), net(clips), atol=1e-5)


@pytest.mark.slow
def test_gkd_from_a_teacher_without_attention_is_one_line_error_and_no_run(local_tracking, gkd_set, tmp_path, kdhar_cli):
    from kdhar.config import ClipConfig, DataConfig, ModelConfig, OptimConfig, RunConfig
    from kdhar.train import run_training

    cfg = RunConfig(
        data=DataConfig(root=str(gkd_set), num_workers=0, fraction=0.25),
        clip=ClipConfig(clip_len=8, frame_interval=1, test_clips=1, resize=(64, 85), crop=56, augment=False),
        model=ModelConfig(arch="c3d", width=4),
        optim=OptimConfig(epochs=1, batch_size=8, threads=1),
    )
    plain = run_training(cfg, role="teacher", experiment="gkd", progress=False)
    client = MlflowClient(local_tracking)
    exp = client.get_experiment_by_name("gkd").experiment_id
    before = {r.info.run_id for r in client.search_runs([exp])}
    done = kdhar(kdhar_cli, ["distill", "--teacher", f"runs:/{plain.run_id}", "--student", "r3d_18", "--width", "4", "--kd", "gkd",
                  "--epochs", "1", *tiny_options(gkd_set)], local_tracking, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--attention" in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert {r.info.run_id for r in client.search_runs([exp])} == before  # refused before any run began


@pytest.mark.slow
def test_gkd_without_a_teacher_is_the_scratch_plus_attention_baseline(local_tracking, gkd_set, tmp_path, kdhar_cli):
    done = kdhar(kdhar_cli, ["distill", "--teacher", "none", "--student", "c3d", "--width", "4", "--kd", "gkd", "--epochs", "1",
                  *tiny_options(gkd_set)], local_tracking, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(local_tracking)
    [run] = client.search_runs([client.get_experiment_by_name("gkd").experiment_id], "tags.role = 'student'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "attention" and run.data.tags["teacher_arch"] == "none"
    metrics = run.data.metrics
    for key in ("train_task_loss", "train_rec_loss", "train_cvae_recon_loss", "train_cvae_kl_loss", "final_test_video_top1"):
        assert key in metrics, key
    assert not [k for k in metrics if k.endswith(("ad_loss", "gd_loss", "align_loss", "kd_loss"))], sorted(metrics)
    assert not [k for k in run.data.params if k in ("gkd.beta", "gkd.gd_weight", "gkd.method", "gkd.adapter")]
    assert run.data.params["gkd.variant"] == "faithful"
    assert [v.run_id for v in client.search_model_versions("name = 'kdhar-attention-c3d'")] == [run.info.run_id]


@pytest.mark.slow
def test_attention_health_is_logged_each_epoch_and_a_constant_attention_is_flagged(local_tracking, gkd_set, capfd):
    # C3D on 8-frame clips keeps T' = 1: the old "channels" norm makes the attention the GroupNorm's
    # bias for every clip, the default "values" norm keeps it input-dependent.
    from kdhar.config import ClipConfig, DataConfig, GKDConfig, ModelConfig, OptimConfig, RunConfig
    from kdhar.train import run_training

    assert feature_shape(build_model("c3d", 3, width=4), *CLIP)[1] == 1
    client = MlflowClient(local_tracking)
    stds = {}
    for norm in ("values", "channels"):
        cfg = RunConfig(
            data=DataConfig(root=str(gkd_set), num_workers=0, fraction=0.25),
            clip=ClipConfig(clip_len=8, frame_interval=1, test_clips=1, resize=(64, 85), crop=56),
            model=ModelConfig(arch="c3d", width=4), gkd=GKDConfig(attention=True, norm=norm),
            optim=OptimConfig(epochs=2, batch_size=8, threads=1),
        )
        res = run_training(cfg, role="teacher", experiment="health", progress=True, register=False)
        run = client.get_run(res.run_id)
        stds[norm] = metric_steps(client, res.run_id, "attention_std")
        assert sorted(stds[norm]) == [1, 2], norm  # one value per epoch
        flags = metric_steps(client, res.run_id, "attention_degenerate")
        degenerate = norm == "channels"
        assert flags == {1: float(degenerate), 2: float(degenerate)}, norm
        assert run.data.tags["attention_degenerate"] == str(degenerate).lower()
        printed = "degenerate attention (tagged attention_degenerate=true)" in capfd.readouterr().err
        assert printed == degenerate, norm
    # The same attention for every clip of a step; only the weights' drift over the epoch spreads it.
    assert max(stds["channels"].values()) < 1e-4
    assert min(stds["values"].values()) > 1e-2


@pytest.mark.parametrize("epochs", [6, 12, 200])
def test_the_ramp_runs_in_steps_and_meets_upstreams_epoch_weights(epochs):
    share, steps = 0.1, 25
    length = share * epochs  # R epochs: 20 at 200, 1.2 at 12, 0.6 at 6
    at_epoch_end = [ramp_share(e, steps, steps, length) for e in range(epochs)]
    if epochs == 200:  # upstream: epoch e (1-based) has weight min(e, 20) / 20
        assert at_epoch_end == pytest.approx([min(e + 1, 20) / 20 for e in range(epochs)])
    first = ramp_share(0, 1, steps, length)
    assert first == pytest.approx(1 / (steps * length)) and first < 0.1  # never full weight from the first step
    shares = [ramp_share(e, b, steps, length) for e in range(epochs) for b in range(1, steps + 1)]
    assert shares == sorted(shares) and shares[-1] == 1.0
    reached = next(i for i, v in enumerate(shares) if v == 1.0)
    assert reached == pytest.approx(length * steps - 1, abs=1)  # full weight after `share` of the steps


def test_a_training_step_of_the_net_pass_moves_the_ramp_and_the_next_epoch_learns_the_loader_length():
    step = make_step(epochs=10, ramp=0.5)  # R = 5 epochs; the constructor guessed 1 step per epoch
    step.set_pass("net")
    x, y = batch()
    step.train()
    step(x, y)
    step(x, y)
    assert step.batches == 2
    with torch.no_grad():
        step(x, y)  # evaluation does not move it
    assert step.batches == 2
    step.set_epoch(1)
    assert step.steps_per_epoch == 2 and step.batches == 0
    assert step.ramp == pytest.approx(1 / 5)


def test_the_batch_rescale_trains_with_the_batch_but_tests_each_clip_alone():
    net, _ = gkd_parts("tiny3d", 4, seed=0)
    net.rescale = "batch"
    x, _ = batch(b=2)
    net.eval()
    with torch.no_grad():
        together, alone = net(x), net(x[:1])
    assert torch.allclose(together[:1], alone, atol=1e-5)  # at test time the batch does not matter
    net.train()
    with torch.no_grad():
        feature = net.forward_features(x)
        _, trained = net.attended(feature)
    assert not torch.allclose(trained, attend(feature, net.attention(feature), "sample"))


def test_gkd_plus_logit_weighs_the_gkd_ce_task_loss():
    step = make_step(student=("r3d_18", 4), teacher=("c3d", 4), epochs=10, kd=True, ce="sum-softmax").eval()
    step.set_pass("net")
    step.set_epoch(9)
    x, y = batch()
    out = step(x, y)
    plain_ce = F.cross_entropy(out["output"], y)
    assert abs(out["task_loss"].item() - plain_ce.item()) > 1e-4  # the code's CE, not the plain one
    want = 0.75 * out["task_loss"] + 0.25 * out["kd_loss"] + 0.1 * out["ad_loss"] + step.ramp * 0.5 * out["rec_loss"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
