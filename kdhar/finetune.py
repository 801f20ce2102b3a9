"""Transfer: start from a logged model, replace its classifier for the new dataset, train and evaluate."""

from __future__ import annotations

import dataclasses

from kdhar import tracking
from kdhar.config import RunConfig
from kdhar.distill import load_init
from kdhar.objectives import Objective, build_objective
from kdhar.train import RunResult, run_training


def source_info(model_uri: str) -> dict[str, str]:
    """Architecture, width and lineage of a logged model, read from the run that logged it."""
    if not model_uri.startswith(("models:/", "runs:/")):
        raise ValueError(f"--model {model_uri}: expected a models:/ or runs:/ URI of a logged kdhar model")
    run_id = tracking.model_run_id(model_uri)
    tags = tracking.run_tags(run_id)
    params = tracking.run_params(run_id)
    return {
        "run_id": run_id,
        "arch": tags.get("arch", ""),
        "width": params.get("model.width", "64"),
        "teacher_arch": tags.get("teacher_arch", "none"),
        "role": tags.get("role", ""),
        "ssl": params.get("pcl.ssl", "none"),
    }


def default_protocol(model_uri: str) -> str:
    """The fine-tuning protocol a model gets unless told: PCL's code's ("pcl") for a model trained
    inside PCL (a PCL student or a label-free PCL encoder), else "plain"."""
    return "pcl" if source_info(model_uri)["ssl"] == "pcl" else "plain"


def protocol_objective(cfg: RunConfig) -> Objective | None:
    """The objective of a fine-tune under PCL's protocol: the run's own, with the epoch of lowest
    validation loss selecting (`best.pt`, `sel_acc_*`), as PCL's code tests its best-validation
    checkpoint; None (the run's own, selecting by validation accuracy) for "plain"."""
    if cfg.finetune.protocol != "pcl":
        return None
    objective = build_objective(cfg)
    note = (" Fine-tuned as PCL's code does: the lr x0.1 after "
            f"{cfg.optim.plateau_patience} epochs without a lower validation loss, the epoch of lowest validation "
            "loss selected (sel_acc_*).")
    return dataclasses.replace(objective, selection_metric="val_loss", description=objective.description + note)


def finetune(
    model_uri: str,
    cfg: RunConfig,
    *,
    experiment: str,
    tags: dict[str, str] | None = None,
    resume: str | None = None,
    allow_config_change: bool = False,
    device: str | None = None,
    progress: bool = True,
    explicit: frozenset[str] = frozenset(),
    parent_run_id: str | None = None,
    stage_models: bool | None = None,
) -> RunResult:
    """Fine-tunes `model_uri` on `cfg`'s dataset.

    The architecture and width come from the source model, and so do the clip settings (length,
    interval, resize, crop) except those named in `explicit` (options the user gave). How it trains
    and which epoch it reports is `cfg.finetune.protocol`'s (`protocol_objective`; the CLI and grids
    default to `default_protocol`). `stage_models`: see `run_training` (a fine-tune is supervised, so
    off unless asked).
    """
    from kdhar.evaluation import trained_clip

    src = source_info(model_uri)
    model_cfg = dataclasses.replace(cfg.model, arch=src["arch"], width=int(float(src["width"])))
    trained = tracking.load_run_dict(src["run_id"], "config.json")
    modality = trained.get("model.modality", "rgb")
    if "modality" in explicit and cfg.model.modality != modality:
        # Its filters were trained on one kind of input; fed the other they start from noise.
        raise ValueError(f"--model {model_uri} was trained on {modality} input, so it fine-tunes on {modality} "
                         f"input: --modality {cfg.model.modality} cannot apply to it; leave --modality out")
    cfg = trained_clip(dataclasses.replace(cfg, model=model_cfg), trained, explicit)
    if "gkd.variant" in trained:
        # A model with GKD's attention module keeps it (its classifier reads the attended feature) and
        # trains on as it was trained, CVAE pass included (a new CVAE: the logged graph has none).
        gkd = dataclasses.replace(cfg.gkd, attention=True, **{k: trained[f"gkd.{k}"] for k in ("variant", "ce", "rescale")
                                                              if f"gkd.{k}" in trained})
        cfg = dataclasses.replace(cfg, gkd=gkd)
    run_tags = {
        "source_model": model_uri,
        "source_run": src["run_id"],
        "source_role": src["role"],
        "source_teacher_arch": src["teacher_arch"],
        "student_arch": src["arch"],
        "finetune_protocol": cfg.finetune.protocol,
        **(tags or {}),
    }
    return run_training(
        cfg,
        role="finetune",
        experiment=experiment,
        init_state=load_init(model_uri),
        objective=protocol_objective(cfg),
        resume=resume,
        allow_config_change=allow_config_change,
        tags=run_tags,
        device=device,
        progress=progress,
        parent_run_id=parent_run_id,
        stage_models=stage_models,
    )
