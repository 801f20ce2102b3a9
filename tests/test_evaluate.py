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


@pytest.fixture(scope="module")
def tiny_hmdb(tmp_path_factory) -> Path:
    """An HMDB51-layout set: other class names (and count) than `tiny_set`'s UCF101 layout."""
    root = tmp_path_factory.mktemp("evaluate") / "hmdb51"
    generate(root, "hmdb51", SynthSpec(num_classes=4, groups=4, clips_per_group=2, frames=12, size=(48, 64), seed=5))
    return root


def test_a_ucf101_model_is_scored_on_hmdb51_by_retrieval_and_probe_but_never_by_accuracy(
        local_tracking, tiny_set, tiny_hmdb, tmp_path, kdhar_cli):
    from kdhar.data.index import load_index
    from kdhar.evaluation import evaluate_model

    cfg = RunConfig(
        data=DataConfig(root=str(tiny_set), num_workers=0, val_fraction=0.0),
        clip=ClipConfig(clip_len=4, frame_interval=2, test_clips=1, resize=(40, 53), crop=32),
        model=ModelConfig(arch="tiny3d", width=4),
        optim=OptimConfig(epochs=1, batch_size=8, threads=1),
    )
    uri = f"runs:/{run_training(cfg, role='teacher', experiment='eval', progress=False, register=False).run_id}"
    client = MlflowClient(local_tracking)
    exp = client.get_experiment_by_name("eval").experiment_id
    # Its 3-way classifier means nothing on HMDB51's 4 classes: accuracy alone is refused, naming the way out.
    hmdb = RunConfig(data=DataConfig(dataset="hmdb51", root=str(tiny_hmdb), num_workers=0),
                     optim=OptimConfig(batch_size=8, threads=1))
    with pytest.raises(ValueError, match=rf"model {uri} was trained on 3 classes .* but the dataset has 4 .*: its "
                                         r"accuracy here would mean nothing; score its features on this dataset with "
                                         r"--retrieval true or --probe true"):
        evaluate_model(uri, hmdb, experiment="eval")
    assert not client.search_runs([exp], "tags.role = 'evaluation'")

    # Its features are scored: HMDB51's test videos against HMDB51's whole training list.
    done = kdhar_cli("evaluate", "--model", uri, "--dataset", "hmdb51", "--root", tiny_hmdb, "--retrieval", "true",
                     "--probe", "true", "--num-workers", "0", "--experiment", "eval", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = dict(item.split("=") for item in done.stdout.strip().split(", "))
    assert "retrieval_top1" in printed and "probe_top1" in printed and not any(k.startswith("test_") for k in printed)
    [evaluation] = client.search_runs([exp], "tags.role = 'evaluation'")
    m = evaluation.data.metrics
    listed = len(load_index("hmdb51", str(tiny_hmdb), 1, "train").samples)
    tested = len(load_index("hmdb51", str(tiny_hmdb), 1, "test").samples)
    assert m["retrieval_gallery_videos"] == m["probe_train_videos"] == listed
    assert m["retrieval_query_videos"] == m["probe_test_videos"] == tested
    assert not any(k.startswith("test_") for k in m)  # no accuracy of the UCF101 head
    assert evaluation.data.tags["dataset"] == "hmdb51" and evaluation.data.tags["scored"] == "retrieval,probe"
    assert not [a for a in client.list_artifacts(evaluation.info.run_id) if a.path == "confusion_matrix.png"]
