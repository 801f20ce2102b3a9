"""Scoring a logged model on a dataset's test split (the `evaluate` entry point)."""

from __future__ import annotations

import dataclasses

import torch

from kdhar import tracking
from kdhar.config import RunConfig
from kdhar.data.dataset import VideoClipDataset, make_loader
from kdhar.engine import evaluate
from kdhar.plots import confusion_figure
from kdhar.train import check_same_classes, load_splits, pick_device


# How clips were cut for training: an exported model takes only these sizes, so evaluation reads
# them from the model's own run unless the user sets them.
TRAINED_CLIP = ("clip_len", "frame_interval", "crop", "resize", "normalize")


def trained_clip(cfg: RunConfig, trained: dict, explicit: frozenset[str] = frozenset()) -> RunConfig:
    """`cfg` with the clip settings and modality of the model's training run (`trained`: its
    config.json), except those in `explicit`. Runs from before modalities existed were rgb, and
    those from before normalisations existed were normalised "half" (the ClipConfig default)."""
    changes = {k: trained[f"clip.{k}"] for k in TRAINED_CLIP if k not in explicit and f"clip.{k}" in trained}
    if "resize" in changes:
        changes["resize"] = tuple(changes["resize"])
    model = cfg.model if "modality" in explicit else dataclasses.replace(
        cfg.model, modality=trained.get("model.modality", "rgb"))
    return dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, **changes), model=model)


def evaluate_model(
    model_uri: str, cfg: RunConfig, *, experiment: str, device: str | None = None, explicit: frozenset[str] = frozenset(),
    parent_run_id: str | None = None, retrieval: bool = False, probe: bool = False,
) -> dict[str, float]:
    """Evaluates a logged model on the test split and records the result as an `evaluation` run.

    Clip length, frame interval, resize and crop come from the model's training run, except the
    ones named in `explicit` (options the user gave). `retrieval`: also top-k clip retrieval of the
    test videos against the whole training list (`kdhar.retrieval`); `probe`: also a linear probe
    fitted on the frozen features of the whole training list and scored on the test videos
    (`kdhar.probe`). Both read the trunk's features only, so they score a label-free encoder (PCL
    pretraining, whose classifier is untrained) and a model of another class set (a UCF101 model
    on HMDB51); neither has its accuracy scored.

    Raises:
        ValueError: the model's classes differ from the dataset's and no feature score is asked,
            explicit clip settings the exported model cannot take, or a label-free encoder without
            `retrieval` or `probe`.
    """
    dev = pick_device(device)
    run_id = tracking.model_run_id(model_uri)
    features = retrieval or probe
    label_free = _check_scorable(model_uri, run_id, features)
    trained = tracking.load_run_dict(run_id, "config.json")
    if trained.get("task") == "detection":
        raise ValueError(f"model {model_uri} is a temporal detector: score it with `kdhar detect evaluate --model {model_uri}`")
    cfg = trained_clip(cfg, trained, explicit)
    modality = trained.get("model.modality", "rgb")
    if cfg.model.modality != modality:
        # The logged model computes its own input modality; scoring cannot change it.
        raise ValueError(f"model {model_uri} was trained on {modality} input and converts clips itself; "
                         f"--modality {cfg.model.modality} cannot apply to it: leave --modality out")
    splits = load_splits(cfg)
    classes = tracking.load_run_dict(run_id, "classes.json")["classes"]
    classify = not label_free and _classes_fit(model_uri, classes, splits.classes, features)
    ds = VideoClipDataset(splits.test, cfg.clip, train=False, on_bad=cfg.data.on_bad)
    loader = make_loader(ds, cfg.optim.batch_size, shuffle=False, num_workers=cfg.data.num_workers, seed=0, pin_memory=dev.type == "cuda")
    result, metrics = None, {}
    if classify:
        result, metrics = _score_classifier(model_uri, trained, cfg, classes, loader, dev)
    if features:
        encoder = _encoder(model_uri, run_id, trained, len(classes), dev)
        metrics.update(feature_scores(encoder, cfg, splits, dev, loader, retrieval=retrieval, probe=probe))
    scored = [name for name, on in (("accuracy", classify), ("clip retrieval", retrieval), ("linear probe", probe)) if on]
    _log_evaluation(model_uri, run_id, cfg, splits, metrics, result, classes, experiment, parent_run_id, scored)
    return metrics


def _check_scorable(model_uri: str, run_id: str, features: bool) -> bool:
    """Whether the model is a label-free encoder; refuses to score one's accuracy, since its classifier
    never saw a label and its accuracy would be chance that reads as a result."""
    tags = tracking.run_tags(run_id)
    label_free = tags.get("role") == "pretrain" or tags.get("method") == "pcl-ssl"
    if label_free and not features:
        raise ValueError(
            f"model {model_uri} is a label-free (self-supervised) encoder: its classifier was never trained, so "
            f"accuracy would score chance; score its features with --retrieval or --probe, or fine-tune it first "
            f"(kdhar finetune --model {model_uri}) and evaluate that model"
        )
    return label_free


def _classes_fit(model_uri: str, classes: list[str], dataset_classes: list[str], features: bool) -> bool:
    """Whether the model's classifier can be scored on the dataset: its classes are the dataset's.
    Another class set (a UCF101 model on HMDB51) is refused unless only its features are scored,
    which read no classifier."""
    if list(classes) == list(dataset_classes):
        return True
    if features:
        return False
    raise ValueError(
        f"model {model_uri} was trained on {len(classes)} classes ({', '.join(classes[:3])}, ...) but the dataset "
        f"has {len(dataset_classes)} ({', '.join(dataset_classes[:3])}, ...): its accuracy here would mean nothing; "
        f"score its features on this dataset with --retrieval true or --probe true, or fine-tune it first "
        f"(kdhar finetune --model {model_uri})"
    )


def _score_classifier(model_uri, trained, cfg, classes, loader, dev) -> tuple[dict, dict[str, float]]:
    """Clip and video accuracy of the logged model on the test split, once the model takes the clips."""
    model = tracking.load_model(model_uri, dev)
    shape = f"{cfg.clip.clip_len}x{cfg.clip.crop}x{cfg.clip.crop}"
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, cfg.clip.clip_len, cfg.clip.crop, cfg.clip.crop, device=dev))
    except Exception as exc:  # torch.export's guard errors have no common type
        expected = f"{trained.get('clip.clip_len')}x{trained.get('clip.crop')}x{trained.get('clip.crop')}"
        raise ValueError(
            f"model {model_uri} takes clips of {expected} (frames x crop x crop), the size it was trained on, "
            f"not {shape}: leave --clip-len/--crop out to use its own"
        ) from exc
    result = evaluate(model, loader, dev, len(classes))
    metrics = {f"test_{k}": float(result[k]) for k in ("clip_top1", "clip_top5", "video_top1", "mean_class_acc", "loss")}
    return result, metrics


def _log_evaluation(model_uri, run_id, cfg, splits, metrics, result, classes, experiment, parent_run_id,
                    scored: list[str]) -> None:
    """The `evaluation` run: what was scored on which data, its metrics and, for a classifier, its confusion."""
    tags = {"role": "evaluation", "source_model": model_uri, "source_run": run_id, "dataset": cfg.data.dataset,
            "dataset_fingerprint": splits.fingerprint, "scored": ",".join(s.split()[-1] for s in scored)}
    arch = tracking.run_tags(run_id).get("arch", "model")
    tags["mlflow.note.content"] = (f"Scores {model_uri} ({arch}, run {run_id}) on the {cfg.data.dataset} test split "
                                   f"({cfg.data.root}, {len(splits.test.samples)} videos): {' and '.join(scored)}.")
    name = f"evaluate-{arch}-{run_id[:8]}-{cfg.data.dataset}"  # which model, which data
    with tracking.RunTracker(experiment, run_name=name, tags=tags, parent_run_id=parent_run_id) as tracker:
        tracker.log_params({**cfg.params(kd=False), "model_uri": model_uri})
        tracker.log_metrics(metrics, step=0)
        if result is not None:
            tracker.log_figure(confusion_figure(result["confusion"], classes), "confusion_matrix.png")
            tracker.log_dict({"per_class": result["per_class"], "classes": classes}, "per_class_report.json")


def _encoder(model_uri, run_id, trained, num_classes, dev) -> torch.nn.Module:
    """The logged model's network with its trunk's feature maps exposed, which an exported model
    does not: the architecture is rebuilt from the model's run and given the logged weights."""
    from kdhar.distill import load_init
    from kdhar.models import build_model
    from kdhar.train import load_compatible

    arch = tracking.run_tags(run_id).get("arch")
    encoder = build_model(arch, num_classes, width=int(float(trained.get("model.width", 64))),
                          modality=trained.get("model.modality", "rgb"),
                          keep_time=int(float(trained.get("model.keep_time", 0))))
    skipped = load_compatible(encoder, load_init(model_uri))
    if skipped:
        raise ValueError(f"model {model_uri}: weights {', '.join(skipped[:3])} do not fit a {arch} rebuilt from its run")
    return encoder.to(dev)


def feature_scores(encoder: torch.nn.Module, cfg: RunConfig, splits, dev, test_loader=None, *, retrieval: bool = True,
                   probe: bool = True) -> dict[str, float]:
    """Label-free retrieval and the linear probe of the encoder's frozen video features: the whole
    training list (whatever the run's fraction and hold-out) against the test videos, the features
    extracted once for both (`kdhar.retrieval.split_features`); the probe's seed is the run's."""
    from kdhar.probe import probe_scores
    from kdhar.retrieval import retrieval_scores, split_features

    train, test = split_features(encoder, cfg, splits, dev, test_loader=test_loader)
    out = retrieval_scores(train, test) if retrieval else {}
    if probe:
        out.update(probe_scores(*train, *test, seed=cfg.optim.seed))
    return out


def evaluate_detector(
    model_uri: str, cfg: RunConfig, *, experiment: str, device: str | None = None, explicit: frozenset[str] = frozenset(),
    parent_run_id: str | None = None,
) -> dict[str, float]:
    """Scores a logged detector on the test videos (mAP at THUMOS14's and GKD's tIoUs, per-class AP,
    timelines) and records it as an `evaluation` run.

    The windows (length, frames per step, test stride, resize, crop) come from the detector's own
    run, except those named in `explicit` (a test stride given here); the decoding (NMS) is this
    command's.

    Raises:
        ValueError: the model is no detector trained by kdhar, or its classes differ from the dataset's.
    """
    from kdhar.detector_eval import DetectionEvaluation, ap_table, timelines
    from kdhar.objectives.detection_factory import DETECTOR_STATE

    dev = pick_device(device)
    run_id = tracking.model_run_id(model_uri)
    trained = tracking.load_run_dict(run_id, "config.json")
    if trained.get("task") != "detection" or tracking.load_run_torch(run_id, DETECTOR_STATE) is None:
        raise ValueError(f"model {model_uri} is not a temporal detector trained by kdhar; score a recognition model "
                         "with `kdhar evaluate`")
    cfg = trained_windows(cfg, trained, explicit)
    splits = load_splits(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.0)))
    classes = tracking.load_run_dict(run_id, "classes.json")["classes"]
    check_same_classes(f"model {model_uri}", classes, splits.classes)
    model = tracking.load_model(model_uri, dev)
    scoring = DetectionEvaluation(cfg.clip, cfg.window, cfg.det)
    data = scoring.datasets(splits)["test"]
    loader = make_loader(data, cfg.optim.batch_size, shuffle=False, num_workers=cfg.data.num_workers, seed=0,
                         pin_memory=dev.type == "cuda", collate_fn=scoring.collate)
    result = scoring.score(model, "test", loader, dev)
    metrics = result.metrics("test", per_class=True)
    arch = tracking.run_tags(run_id).get("arch", "model")
    tags = {"role": "evaluation", "task": "detection", "source_model": model_uri, "source_run": run_id,
            "dataset": cfg.data.dataset, "dataset_fingerprint": splits.fingerprint,
            "mlflow.note.content": (f"Scores detector {model_uri} ({arch}, run {run_id}) on the test videos of "
                                    f"{cfg.data.root} ({len(splits.test.videos)} videos), {cfg.det.nms} NMS.")}
    with tracking.RunTracker(experiment, run_name=f"det-evaluate-{arch}-{run_id[:8]}", tags=tags,
                             parent_run_id=parent_run_id) as tracker:
        tracker.log_params({**cfg.params(kd=False), "model_uri": model_uri})
        tracker.log_metrics(metrics, step=0)
        tracker.log_figure(timelines(result, data), "timelines.png")
        tracker.log_dict(ap_table(result), "per_class_ap.json")
    return metrics


# How windows were cut for training: an exported detector takes only these sizes.
TRAINED_WINDOW = {"window.length": ("window", "length"), "window.frame_interval": ("window", "frame_interval"),
                  "window.test_stride": ("window", "test_stride"), "clip.crop": ("clip", "crop"),
                  "clip.resize": ("clip", "resize"), "model.modality": ("model", "modality")}


def trained_windows(cfg: RunConfig, trained: dict, explicit: frozenset[str] = frozenset()) -> RunConfig:
    """`cfg` with the window length, frames per step, test stride, resize, crop and modality of the
    detector's training run (`trained`: its config.json), except the options in `explicit`."""
    sections: dict[str, dict] = {}
    for key, (section, name) in TRAINED_WINDOW.items():
        option = "window_length" if key == "window.length" else name
        if key in trained and option not in explicit:
            value = trained[key]
            sections.setdefault(section, {})[name] = tuple(value) if name == "resize" else value
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()})
