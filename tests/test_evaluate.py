"""`kdhar evaluate` on a logged model: clip settings come from the model's own run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from kdhar.config import ClipConfig, DataConfig, ModelConfig, OptimConfig, RunConfig
from kdhar.data.synthetic import SynthSpec, generate
from kdhar.train import run_training


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate") / "ucf101"
    generate(root, "ucf101", SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=12, size=(48, 64), seed=4))
    return root


def test_evaluate_takes_clip_settings_from_the_models_run(local_tracking, tiny_set, tmp_path, kdhar_cli):
    # Trained on 4-frame 32x32 clips; the evaluate command's size preset would cut 8-frame 56x56 ones.
    cfg = RunConfig(
        data=DataConfig(root=str(tiny_set), num_workers=0, val_fraction=0.0),
        clip=ClipConfig(clip_len=4, frame_interval=2, test_clips=1, resize=(40, 53), crop=32),
        model=ModelConfig(arch="tiny3d", width=4),
        optim=OptimConfig(epochs=1, batch_size=8, threads=1),
    )
    res = run_training(cfg, role="teacher", experiment="eval", progress=False, register=False)
    base = ["evaluate", "--model", f"runs:/{res.run_id}", "--root", str(tiny_set), "--num-workers", "0",
            "--experiment", "eval"]
    ok = kdhar_cli(*base, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "test_video_top1=" in ok.stdout
    client = MlflowClient(local_tracking)
    [evaluation] = client.search_runs([client.get_experiment_by_name("eval").experiment_id], "tags.role = 'evaluation'")
    assert evaluation.data.params["clip.crop"] == "32" and evaluation.data.params["clip.clip_len"] == "4"

    bad = kdhar_cli(*base, "--crop", "48", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("Error: model runs:/")
    assert "takes clips of 4x32x32" in bad.stderr and "Traceback" not in bad.stderr


def test_residual_modality_travels_with_the_logged_model(local_tracking, tiny_set, tmp_path, kdhar_cli):
    import torch

    from kdhar import tracking

    cfg = RunConfig(
        data=DataConfig(root=str(tiny_set), num_workers=0, val_fraction=0.0),
        clip=ClipConfig(clip_len=4, frame_interval=2, test_clips=1, resize=(40, 53), crop=32),
        model=ModelConfig(arch="tiny3d", width=4, modality="res"),
        optim=OptimConfig(epochs=1, batch_size=8, threads=1),
    )
    res = run_training(cfg, role="teacher", experiment="eval", progress=False, register=False)
    run = MlflowClient(local_tracking).get_run(res.run_id)
    assert run.data.params["model.modality"] == "res" and run.data.tags["modality"] == "res"

    # The exported graph computes the residual itself: a clip that does not change over time has a
    # zero residual, so it scores exactly like an all-zero clip, whatever its colour.
    model = tracking.load_model(f"runs:/{res.run_id}")
    still = torch.full((2, 3, 4, 32, 32), 0.7)
    with torch.no_grad():
        assert torch.equal(model(still), model(torch.zeros_like(still)))

    base = ["evaluate", "--model", f"runs:/{res.run_id}", "--root", str(tiny_set), "--num-workers", "0",
            "--experiment", "eval"]
    ok = kdhar_cli(*base, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    client = MlflowClient(local_tracking)
    [evaluation] = client.search_runs([client.get_experiment_by_name("eval").experiment_id], "tags.role = 'evaluation'")
    assert evaluation.data.params["model.modality"] == "res"

    bad = kdhar_cli(*base, "--modality", "rgb", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"Error: model runs:/{res.run_id} was trained on res input")

    # Fine-tuning keeps the source model's modality unless told otherwise.
    from kdhar.finetune import finetune

    tuned = finetune(f"runs:/{res.run_id}", RunConfig(data=cfg.data, clip=ClipConfig(), optim=cfg.optim),
                     experiment="eval", progress=False)
    params = client.get_run(tuned.run_id).data.params
    assert params["model.modality"] == "res" and params["clip.crop"] == "32"

    # Told another modality, it refuses before any run starts, rather than feeding rgb clips to
    # filters trained on residual frames.
    runs_before = len(client.search_runs([client.get_experiment_by_name("eval").experiment_id]))
    rgb = RunConfig(data=cfg.data, clip=ClipConfig(), model=ModelConfig(modality="rgb"), optim=cfg.optim)
    with pytest.raises(ValueError, match=r"was trained on res input, so it fine-tunes on res input: --modality rgb "
                                         r"cannot apply to it; leave --modality out"):
        finetune(f"runs:/{res.run_id}", rgb, experiment="eval", progress=False, explicit=frozenset({"modality"}))
    assert len(client.search_runs([client.get_experiment_by_name("eval").experiment_id])) == runs_before
