"""Knowledge distillation runs: teacher resolution, the KD/scratch pairing and the logit cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kdhar import tracking
from kdhar.checkpoint import load_checkpoint
from kdhar.config import RunConfig
from kdhar.data.index import fingerprint, load_index
from kdhar.data.thumos14 import detection_fingerprint, load_detection_index
from kdhar.models import MODELS, build_model
from kdhar.objectives import build_objective
from kdhar.train import RunResult, Teacher, check_same_classes, config_hash, pick_device, run_training

# How many augmented views of each training video a logit cache holds when the run does not say
# (tuning trials); epoch e replays view e % N.
CACHE_VIEWS = 4


def pair_key(cfg: RunConfig, init: str | None = None) -> str:
    """Same for a KD run and its scratch twin: the configuration without the teacher and KD weights
    (the number of replayed views included, so a cached KD run pairs only with a like scratch run).
    The weights a run starts from (`init`) and, with GKD's attention module, the `--kd` method are
    part of it: an --init run pairs only with a twin started from the same weights, and `--kd gkd`
    and `--kd gkd+logit` each with the twin run with the same --kd and --teacher none.

    The seed is left out, so the runs of every seed of a cell share it: a report's row holds them all
    and pairs them seed by seed (with the seed in it, each row held one seed and no test had pairs).
    """
    params = cfg.params(kd=False)
    params.pop("optim.seed")
    if init:
        params["init"] = init
    if cfg.gkd.attention:
        params["gkd.method"] = cfg.gkd.method
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_command(arch: str, attention: bool = False) -> str:
    return f"mlflow run . -e train_teacher -P arch={arch}{' -P attention=true' if attention else ''} --env-manager local"


def resolve_teacher(spec: str, dataset_fingerprint: str, device: torch.device | str = "cpu",
                    attention: bool = False) -> Teacher | None:
    """Turns the `teacher` parameter into a frozen model.

    Accepts `none`, an architecture name (its `champion` for this dataset: among the teachers with
    GKD's attention module when `attention`), a `models:/` or `runs:/` URI, or a checkpoint path
    written by kdhar.
    """
    if spec.lower() == "none":
        return None
    device = pick_device(str(device))  # "auto" picks the best available, as for training
    if spec.startswith(("models:/", "runs:/")):
        return _teacher_from_uri(spec, device)
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ckpt") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
        state = load_checkpoint(path)
        width = int(state["config"].get("model.width", 64))
        modality = state["config"].get("model.modality", "rgb")
        keep_time = int(state["config"].get("model.keep_time", 0))
        model = build_model(state["arch"], len(state["classes"]), width=width, modality=modality, keep_time=keep_time)
        model.load_state_dict(state["model"])
        return Teacher(model=model.eval(), uri=str(path), classes=list(state["classes"]), arch=state["arch"],
                       run_id=state.get("run_id"), normalize=state["config"].get("clip.normalize", "half"))
    if spec in MODELS:
        kind = "teacher-attention" if attention else "teacher"
        uri = tracking.champion_uri(f"kdhar-{kind}-{spec}", dataset_fingerprint)
        if uri is None:
            what = "teacher with GKD's attention module" if attention else "teacher"
            raise ValueError(
                f"no trained {spec} {what} found for this dataset (fingerprint {dataset_fingerprint}); "
                f"train one first: {train_command(spec, attention)}"
            )
        return _teacher_from_uri(uri, device)
    raise ValueError(
        f"teacher '{spec}' is not an architecture ({', '.join(MODELS)}), a models:/ or runs:/ URI, "
        "an existing checkpoint path, or 'none'"
    )


def resolve_detection_teacher(spec: str, dataset_fingerprint: str, device: torch.device | str = "cpu",
                              attention: bool = False) -> Teacher | None:
    """A detection run's `teacher` parameter as a frozen detector: `none`, an architecture name (the
    champion of its detection teachers for this dataset: among those with GKD's attention module when
    `attention`, else a plain one, or failing that one with attention), or a `models:/` / `runs:/` URI
    of a detection run. The detector is rebuilt from the state its run logged (`DETECTOR_STATE`), so
    a student can reach its taps."""
    from kdhar.objectives.detection_factory import DETECTOR_STATE
    from kdhar.objectives.detection_gkd import load_detector_state
    from kdhar.training.identity import registered_name

    if spec.lower() == "none":
        return None
    command = f"kdhar detect train-teacher --arch {spec}{' --attention true' if attention else ''}"
    if spec in MODELS:
        kinds = ("det-attention",) if attention else ("det-scratch", "det-attention")
        uri = next((u for u in (tracking.champion_uri(registered_name("teacher", kind, spec), dataset_fingerprint)
                                for kind in kinds) if u is not None), None)
        if uri is None:
            what = "detection teacher with GKD's attention module" if attention else "detection teacher"
            raise ValueError(f"no trained {spec} {what} found for this dataset (fingerprint {dataset_fingerprint}); "
                             f"train one first: {command}")
    elif spec.startswith(("models:/", "runs:/")):
        uri = spec
    else:
        raise ValueError(f"detection teacher '{spec}' is not an architecture ({', '.join(MODELS)}), a models:/ or "
                         "runs:/ URI of a detection run, or 'none'")
    run_id = tracking.model_run_id(uri)
    state = tracking.load_run_torch(run_id, DETECTOR_STATE)
    if state is None:
        raise ValueError(f"teacher {uri} is not a detector trained by kdhar (its run has no {DETECTOR_STATE}); "
                         "train one with `kdhar detect train-teacher`")
    model, _ = load_detector_state(state)
    classes = tracking.load_run_dict(run_id, "classes.json")["classes"]
    return Teacher(model=model.to(pick_device(str(device))).eval(), uri=uri, classes=list(classes), arch=state["arch"],
                   run_id=run_id, clip=(int(state["length"]), int(state["crop"])))


def check_teacher_windows(teacher: Teacher, cfg: RunConfig) -> None:
    """Refuses a detection teacher built for other windows than the student's (it sees the same ones)."""
    student = (cfg.window.length, cfg.clip.crop)
    if teacher.clip is not None and teacher.clip != student:
        (t_len, t_crop), (s_len, s_crop) = teacher.clip, student
        raise ValueError(
            f"teacher {teacher.uri} was trained on {t_len}-step {t_crop}x{t_crop} windows but the student's are "
            f"{s_len}-step {s_crop}x{s_crop}: pass --window-length {t_len} --crop {t_crop}")


def _teacher_from_uri(uri: str, device) -> Teacher:
    model = tracking.load_model(uri, device)
    run_id = tracking.model_run_id(uri)
    classes = tracking.load_run_dict(run_id, "classes.json")["classes"]
    arch = tracking.run_tags(run_id).get("arch")
    config = tracking.load_run_dict(run_id, "config.json")
    # A logged model is an exported graph that takes only the clip size it was trained on.
    clip = (int(config["clip.clip_len"]), int(config["clip.crop"])) if "clip.crop" in config else None
    return Teacher(model=model.eval(), uri=uri, classes=list(classes), arch=arch, run_id=run_id, clip=clip,
                   normalize=config.get("clip.normalize", "half"))  # runs from before the knob were "half"


def check_teacher_clips(teacher: Teacher, cfg: RunConfig) -> None:
    """Refuses a logged teacher that cannot take the student's clips (it sees exactly those clips)."""
    student = (cfg.clip.clip_len, cfg.clip.crop)
    if teacher.clip is not None and teacher.clip != student:
        (t_len, t_crop), (s_len, s_crop) = teacher.clip, student
        raise ValueError(
            f"teacher {teacher.uri} takes {t_len}-frame {t_crop}x{t_crop} clips, the size it was trained on, but the "
            f"student's are {s_len}-frame {s_crop}x{s_crop}: pass --clip-len {t_len} --crop {t_crop} (or use a "
            "teacher trained on the student's clips)"
        )
    if teacher.normalize is not None and teacher.normalize != cfg.clip.normalize:
        raise ValueError(
            f"teacher {teacher.uri} was trained on clips normalised '{teacher.normalize}' but the student's are "
            f"'{cfg.clip.normalize}' (PCL runs default to imagenet): pass --normalize {teacher.normalize}, or train the "
            f"teacher with --normalize {cfg.clip.normalize}"
        )


def distill(
    cfg: RunConfig,
    *,
    teacher: str,
    experiment: str,
    init: str | None = None,
    resume: str | None = None,
    allow_config_change: bool = False,
    device: str | None = None,
    cache_teacher: bool = False,
    parent_run_id: str | None = None,
    epoch_callback=None,
    register: bool = True,
    progress: bool = True,
    extra_tags: dict[str, str] | None = None,
    run_name: str | None = None,
    stage_models: bool | None = None,
    init_key: str | None = None,
) -> RunResult:
    """One student run: KD from `teacher`, or from scratch when teacher is "none" (a detector when
    `cfg.task` is "detection": score distillation with --kd logit, GKD with --kd gkd). `stage_models`:
    see `run_training`. `init_key` stands for `init` in the pair key (and is tagged): what the weights
    are, the same for every seed (a grid's pretraining configuration), where `init` is one run."""
    d = cfg.data
    if cfg.task == "detection":
        train_index = load_detection_index(d.root, "train", d.split_dir or None, on_missing=d.on_missing)
        t = resolve_detection_teacher(teacher, detection_fingerprint(train_index), device or "cpu",
                                      attention=cfg.gkd.attention)
    else:
        train_index = load_index(d.dataset, d.root, d.split, "train", on_missing=d.on_missing,
                                 split_dir=d.split_dir or None)
        t = resolve_teacher(teacher, fingerprint(train_index), attention=cfg.gkd.attention)
    if t is not None:  # refuse a mismatched teacher before any work (the logit cache included)
        check_same_classes(f"teacher {t.uri}", t.classes, train_index.classes)
        (check_teacher_windows if cfg.task == "detection" else check_teacher_clips)(t, cfg)
    if init:
        check_init_modality(init, cfg.model.modality)
    init_state = load_init(init) if init else None
    tags = {"student_arch": cfg.model.arch, "pair_key": pair_key(cfg, init_key or init), "teacher_spec": teacher,
            **({"init_key": init_key} if init_key else {}), **(extra_tags or {})}
    objective = build_objective(cfg, t, cache_teacher=cache_teacher and t is not None, device=device)
    res = run_training(
        cfg,
        role="student",
        experiment=experiment,
        run_name=run_name,
        objective=objective,
        init_state=init_state,
        init=init,
        resume=resume,
        allow_config_change=allow_config_change,
        tags=tags,
        parent_run_id=parent_run_id,
        epoch_callback=epoch_callback,
        register=register,
        device=device,
        progress=progress,
        stage_models=stage_models,
    )
    if t is not None:
        record_epochs_to_scratch(experiment, res, tags["pair_key"], cfg.optim.seed,
                                 "map_avg" if cfg.task == "detection" else "video_top1")
    return res


def record_epochs_to_scratch(experiment: str, res: RunResult, key: str, seed: int, headline: str = "video_top1") -> None:
    """Logs the first epoch at which a KD run reached its scratch twin's final test score (the twin
    of its seed; `headline`: the video accuracy, or a detector's map_avg), if the twin exists."""
    twins = tracking.find_runs(experiment, f"tags.pair_key = '{key}' and tags.teacher_arch = 'none' and "
                                           f"tags.seed = '{seed}' and attributes.status = 'FINISHED'")
    if not twins:
        return
    target = twins[0]["metrics"].get(f"final_test_{headline}")
    if target is None:
        return
    reached = next((h["epoch"] for h in res.history if h.get(f"test_{headline}", -1) >= target), None)
    tracking.log_metrics_to(res.run_id, {"scratch_final_acc": target, "epochs_to_scratch_acc": reached if reached is not None else -1})


def check_init_modality(spec: str, modality: str) -> None:
    """Refuses starting from a logged model or a checkpoint trained on another input modality (a PCL
    encoder sees residual frames): its filters would meet inputs of another kind. Runs and
    checkpoints from before modalities existed were rgb."""
    if spec.startswith(("models:/", "runs:/")):
        trained = tracking.load_run_dict(tracking.model_run_id(spec), "config.json").get("model.modality", "rgb")
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(f"--init {spec}: no such checkpoint or model URI")
        trained = load_checkpoint(spec).get("config", {}).get("model.modality", "rgb")
    if trained != modality:
        raise ValueError(f"--init {spec} was trained on {trained} input but this run's modality is {modality}: "
                         f"pass --modality {trained}")


def load_init(spec: str) -> dict[str, torch.Tensor]:
    """Weights to start from: a kdhar checkpoint or a logged model URI."""
    if spec.startswith(("models:/", "runs:/")):
        # Logged models are exported graphs whose parameters sit under "graph."; a logged detector's
        # under "graph.detector." (its graph is `DetectorOutputs` around the detector).
        state = {k.removeprefix("graph."): v for k, v in tracking.load_model(spec, "cpu").state_dict().items()}
        if state and all(k.startswith("detector.") for k in state):
            state = {k.removeprefix("detector."): v for k, v in state.items()}
        return state
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--init {spec}: no such checkpoint or model URI")
    return load_checkpoint(path)["model"]


__all__ = ["distill", "resolve_teacher", "pair_key", "config_hash"]
