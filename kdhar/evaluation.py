"""Scoring a logged model on a dataset's test split (the `evaluate` entry point)."""

from __future__ import annotations

from kdhar import tracking
from kdhar.config import RunConfig
from kdhar.data.dataset import VideoClipDataset, make_loader
from kdhar.engine import evaluate
from kdhar.plots import confusion_figure
from kdhar.train import check_same_classes, load_splits, pick_device


def evaluate_model(model_uri: str, cfg: RunConfig, *, experiment: str, device: str | None = None) -> dict[str, float]:
    """Evaluates a logged model on the test split and records the result as an `evaluation` run."""
    dev = pick_device(device)
    splits = load_splits(cfg)
    run_id = tracking.model_run_id(model_uri)
    classes = tracking.load_run_dict(run_id, "classes.json")["classes"]
    model = tracking.load_model(model_uri, dev)
    check_same_classes(f"model {model_uri}", classes, splits.classes)
    ds = VideoClipDataset(splits.test, cfg.clip, train=False, on_bad=cfg.data.on_bad)
    loader = make_loader(ds, cfg.optim.batch_size, shuffle=False, num_workers=cfg.data.num_workers, seed=0, pin_memory=dev.type == "cuda")
    result = evaluate(model, loader, dev, len(classes))
    metrics = {f"test_{k}": float(result[k]) for k in ("clip_top1", "clip_top5", "video_top1", "mean_class_acc", "loss")}
    tags = {"role": "evaluation", "source_model": model_uri, "source_run": run_id, "dataset": cfg.data.dataset,
            "dataset_fingerprint": splits.fingerprint}
    with tracking.RunTracker(experiment, tags=tags) as tracker:
        tracker.log_params({**cfg.params(), "model_uri": model_uri})
        tracker.log_metrics(metrics, step=0)
        tracker.log_figure(confusion_figure(result["confusion"], classes), "confusion_matrix.png")
        tracker.log_dict({"per_class": result["per_class"], "classes": classes}, "per_class_report.json")
    return metrics
