"""One factory from method names to a built objective, so the training loop never learns a method.

`build_objective` turns the run's configuration (`--ssl none|pcl`, or `task` "detection", whose
objectives `detection_factory` builds) and its teacher (or none) into an `Objective`: how to wrap the student into a step module, the data view it trains on (single clips,
or PCL's clip tuples), the knobs to log, the tags that say what the run is, and what each batch
needs beyond the clip (cached teacher logits). Teacher handling, the logit cache and the views live
here and in the step modules, not in `kdhar.train`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

from kdhar.config import RunConfig
from kdhar.models.teacher import Teacher
from kdhar.objectives.kd import KDStep, LogitKD, check_kd
from kdhar.objectives.objective import METHOD_TERMS, Objective, teacher_tags
from kdhar.objectives.supervised import SupervisedStep

__all__ = ["GKD_STATE", "METHOD_TERMS", "Objective", "Teacher", "build_objective", "load_gkd_teacher"]

# Where a GKD model keeps what its exported graph drops (the CVAE), so that it can teach.
GKD_STATE = "gkd/state.pt"


def build_objective(
    cfg: RunConfig, teacher: Teacher | None = None, *, cache_teacher: bool = False, device: str | None = None,
    labels: bool = True,
) -> Objective:
    """The objective for a run: supervised or PCL (`cfg.pcl.ssl`), each without a teacher or with
    logit KD from one.

    Args:
        cfg: the run's configuration (`cfg.kd` holds the KD knobs, `cfg.pcl` the PCL ones,
            `cfg.data.views` the replayed views).
        teacher: the frozen teacher, or None for a scratch/teacher run.
        cache_teacher: look teacher logits up in a cache of the replayed views instead of running
            the teacher each step; needs `cfg.data.views` > 0 (single clips only).
        device: where the cache is computed on first use.
        labels: False for label-free pretraining (PCL only, no teacher).

    Methods: `supervised`, `kd-logit`, `kd-feature` (`--kd feature`), `pcl`, `pcl+kd-logit`, `pcl-ssl`,
    and with GKD's attention module `attention`, `gkd`, `gkd+kd-logit`.

    Raises:
        ValueError: unusable KD settings, a cache without replayed views or with PCL, or a
            label-free run that is not PCL or has a teacher.
    """
    if cfg.task == "detection":
        from kdhar.objectives.detection_factory import detection_objective

        if cache_teacher or not labels:
            raise ValueError("a detection run learns from its segments and runs its teacher on each window: "
                             "leave --cache-teacher out")
        return detection_objective(cfg, teacher)
    if cfg.pcl.ssl == "pcl":
        return _pcl_objective(cfg, teacher, cache_teacher, labels)
    if cfg.gkd.attention:
        return _gkd_objective(cfg, teacher, cache_teacher)
    if not labels:
        raise ValueError("label-free training is PCL's: use --ssl pcl")
    if teacher is None:
        return Objective(name="supervised", make_step=lambda model, _n: SupervisedStep(model), tags={"method": "supervised"})
    if cfg.gkd.method == "feature":
        return _feature_objective(cfg, teacher, cache_teacher)
    kd = cfg.kd
    check_kd(kd.tau, kd.weighting, kd.alpha, kd.lam)
    tags = teacher_tags("kd-logit", teacher)
    extras = None
    if cache_teacher:
        if cfg.data.views < 1:
            raise ValueError(
                "the teacher-logit cache replays a fixed set of views: set views (e.g. --views 4) on this "
                "run and on its scratch twin, so both see the same number of augmented views"
            )
        from kdhar.cache import TeacherLogitCache

        cache = TeacherLogitCache.build(teacher, cfg, views=cfg.data.views, device=device)
        tags["teacher_cache"] = cache.key

        def extras(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return {"teacher_logits": cache.lookup(batch)}

    def make_step(student: nn.Module, _num_train: int) -> nn.Module:
        return KDStep(student, teacher.model, tau=kd.tau, lam=kd.lam, weighting=kd.weighting, alpha=kd.alpha)

    return Objective(
        name="kd-logit", make_step=make_step,
        params={f"kd.{k}": v for k, v in kd.method_params().items()}, tags=tags, teacher=teacher,
        batch_extras=extras, soft_term="kd_loss",
    )


def _pcl_objective(cfg: RunConfig, teacher: Teacher | None, cache_teacher: bool, labels: bool) -> Objective:
    """PCL on clip tuples: label-free (pretraining), with action CE (the scratch twin), or with logit
    KD from `teacher` on the action head (reading A of ../shared/methods/pcl.md)."""
    from kdhar.data.tuples import TupleClipDataset, TupleLayout
    from kdhar.objectives.pcl import PCLStep

    if cache_teacher:
        raise ValueError("--cache-teacher replays single clips; a PCL run feeds its teacher each tuple's clips: "
                         "leave --cache-teacher out")
    if teacher is not None and not labels:
        raise ValueError("label-free PCL pretraining takes no teacher: use distill --ssl pcl for PCL with KD")
    pcl, kd, clip = cfg.pcl, cfg.kd, cfg.clip
    layout = TupleLayout(clip_len=clip.clip_len, interval=pcl.interval, tuple_len=clip.tuple_len, stride=pcl.clip_stride)
    name = "pcl-ssl" if not labels else ("pcl" if teacher is None else "pcl+kd-logit")
    params = {f"kd.{k}": v for k, v in kd.method_params().items()} if teacher is not None else {}
    if teacher is not None:
        check_kd(kd.tau, kd.weighting, kd.alpha, kd.lam)

    tags = teacher_tags(name, teacher) if teacher is not None else {"method": name}
    tags["ssl"] = "pcl"

    def make_step(model: nn.Module, num_train: int) -> nn.Module:
        term = None
        if teacher is not None:
            term = LogitKD(teacher.model, tau=kd.tau, lam=kd.lam, weighting=kd.weighting, alpha=kd.alpha)
        if pcl.contrast == "nce":
            tags.update(bank_note(num_train, pcl.negatives))
        return PCLStep(model, num_train, pcl, tuple_len=layout.tuple_len, labels=labels, kd=term)

    def tuples(index, train: bool, seed: int, cache_bytes: int = 0) -> TupleClipDataset:
        return TupleClipDataset(index, clip, layout, train=train, seed=seed, spatial_perm=pcl.spatial_perm,
                                swap_pairs=pcl.swap_pairs, cache_bytes=cache_bytes)

    def make_data(index, seed: int, cache_bytes: int = 0) -> TupleClipDataset:
        data = tuples(index, True, seed, cache_bytes)
        if len(data) == 0:
            raise ValueError(
                f"none of the {data.too_short} training videos in {index.root} has the {layout.span} frames a tuple of "
                f"{layout.tuple_len} {layout.clip_len}-frame clips {layout.interval} apart needs: lower --clip-len or "
                "--pcl-interval")
        if data.too_short:
            print(f"[pcl] {data.too_short} of {data.too_short + len(data)} training videos are shorter than a tuple "
                  f"({layout.span} frames) and are left out", file=sys.stderr, flush=True)
        return data

    def make_validation(index, seed: int) -> TupleClipDataset | None:
        # PCL's self-supervised validation: the pretext task on fixed tuples of the test list.
        data = tuples(index, False, seed)
        return data if len(data) else None

    def final_metrics(model: nn.Module, run_cfg: RunConfig, splits: Any, device: Any) -> dict[str, float]:
        from kdhar.retrieval import retrieval_on_splits

        return retrieval_on_splits(model, run_cfg, splits, device)  # a label-free measure of the encoder

    description = (f" Trained inside PCL on tuples of {clip.tuple_len} clips {pcl.interval} apart ({pcl.clip_stride} "
                   f"stride): the 5-way pretext task plus {pcl.contrast_weight:g} x the {pcl.contrast} contrastive loss"
                   + (", and the action head on the first and last clips." if labels else ", no labels."))
    return Objective(name=name, make_step=make_step, params=params, tags=tags, teacher=teacher,
                     soft_term="kd_loss" if teacher is not None else None, view="tuple", make_data=make_data,
                     make_validation=make_validation, plateau_metric="ssl_val_pretext_loss",
                     selection_metric="ssl_val_pretext_loss", final_metrics=final_metrics,
                     name_prefix="pcl-", description=description, labels=labels)


def bank_note(rows: int, negatives: int) -> dict[str, str]:
    """The memory bank's size as run tags (`bank_rows`, `bank_below_negatives`); a bank with fewer
    rows than K negatives (a 2 % share of UCF101 has about 190) is also said once on stderr, by
    rank 0 alone under torchrun: each sample's K draws then repeat rows and may hold its own row."""
    below = rows < negatives
    if below and os.environ.get("RANK", "0") == "0":
        print(f"[pcl] warning: the memory bank has {rows} rows (training videos), fewer than its {negatives} "
              "negatives: each draw repeats rows and may hold the positive's own (tagged bank_below_negatives=true)",
              file=sys.stderr, flush=True)
    return {"bank_rows": str(rows), "bank_below_negatives": str(below).lower()}


def load_gkd_teacher(teacher: Teacher) -> tuple[nn.Module, nn.Module]:
    """The teacher's GKD network and CVAE, from the state its run logged (`GKD_STATE`).

    Raises:
        ValueError: the teacher was trained without the attention module (or is not a logged run).
    """
    from kdhar import tracking
    from kdhar.objectives.gkd import load_gkd_state

    train = f"`kdhar train-teacher --arch {teacher.arch or 'ARCH'} --attention`"
    hint = (f"teacher {teacher.uri} has no GKD attention module and CVAE: train one with {train} (add --init "
            f"{teacher.uri} to continue from this teacher)")
    if not teacher.run_id:
        raise ValueError(hint)
    try:
        state = tracking.load_run_torch(teacher.run_id, GKD_STATE)
    except Exception as exc:
        if not tracking.is_bad_reference(exc):
            raise
        # A checkpoint file travels without its run: the attention module and CVAE stay in the store it was trained in.
        raise ValueError(
            f"teacher {teacher.uri}: its run {teacher.run_id} is not in the tracking store "
            f"{tracking.mask_uri(tracking.tracking_uri())}, which is where GKD finds the teacher's attention module and "
            f"CVAE; set MLFLOW_TRACKING_URI to the store it was trained in, or train one here with {train}") from None
    if state is None:
        raise ValueError(hint)
    return load_gkd_state(state)


def load_feature_teacher(teacher: Teacher) -> nn.Module:
    """The teacher as a network whose trunk can be read (`forward_features`), for feature KD.

    A kdhar checkpoint is one already. A logged model is an exported graph that gives logits only:
    a GKD teacher's network comes back from the state it logged (`GKD_STATE`), any other teacher's
    architecture is rebuilt from its run's configuration and given the graph's weights.

    Raises:
        ValueError: a teacher that is neither a checkpoint nor a logged kdhar run.
    """
    if hasattr(teacher.model, "forward_features"):
        return teacher.model
    from kdhar import tracking
    from kdhar.models import build_model
    from kdhar.objectives.gkd import load_gkd_state

    if not teacher.run_id or not teacher.arch:
        raise ValueError(f"teacher {teacher.uri}: feature KD reads the teacher's last feature map, which this model does "
                         "not expose; pass the teacher's run (runs:/<run id>) or a kdhar checkpoint")
    state = tracking.load_run_torch(teacher.run_id, GKD_STATE)
    if state is not None:
        return load_gkd_state(state)[0]
    config = tracking.load_run_dict(teacher.run_id, "config.json")
    model = build_model(teacher.arch, len(teacher.classes), width=int(float(config.get("model.width", 64))),
                        modality=config.get("model.modality", "rgb"), keep_time=int(float(config.get("model.keep_time", 0))))
    # An exported graph's parameters sit under "graph." (as kdhar.distill.load_init reads them)
    model.load_state_dict({k.removeprefix("graph."): v.cpu() for k, v in teacher.model.state_dict().items()})
    return model.eval()


def _feature_objective(cfg: RunConfig, teacher: Teacher, cache_teacher: bool) -> Objective:
    """Feature KD (`--kd feature`): CE plus the FitNets-style hint loss on the last feature map."""
    from kdhar.objectives.feature import FeatureKDStep

    if cache_teacher:
        raise ValueError("--cache-teacher stores logits only; feature KD needs the teacher's feature each step: leave it out")
    network = load_feature_teacher(teacher)
    weight, clip = cfg.feature.weight, cfg.clip
    params: dict[str, Any] = {"feature.weight": weight}

    def make_step(model: nn.Module, _num_train: int) -> nn.Module:
        step = FeatureKDStep(model, network, weight, (clip.clip_len, clip.crop))
        params["feature.adapter"] = step.regressor.describe()  # the regressor onto the teacher's feature
        return step

    description = (f" Distilled with feature KD: CE + {weight:g} x the MSE between its last feature, mapped by a learned "
                   "1x1x1 regressor to the teacher's shape, and the teacher's last feature (FitNets-style hint).")
    return Objective(name="kd-feature", make_step=make_step, params=params, tags=teacher_tags("kd-feature", teacher),
                     teacher=teacher, name_prefix="feature-", description=description)


def _gkd_objective(cfg: RunConfig, teacher: Teacher | None, cache_teacher: bool) -> Objective:
    """The attention module and its CVAE in two passes per epoch: without a teacher GKD's phase 1 (a
    teacher for GKD, or the "scratch + attention module" baseline); with one, GKD (`--kd gkd`) or
    GKD with logit KD on top (`--kd gkd+logit`)."""
    from kdhar.objectives.gkd import GKDStep, build_gkd_net, gkd_state

    g, kd, clip = cfg.gkd, cfg.kd, cfg.clip
    if cache_teacher:
        raise ValueError("--cache-teacher stores logits only; GKD needs the teacher's features each step: leave it out")
    if teacher is not None and not g.distils:
        raise ValueError("a run with the attention module distils with --kd gkd or gkd+logit; for logit KD leave "
                         "--attention out")
    parts = load_gkd_teacher(teacher) if teacher is not None else (None, None)
    if teacher is None:
        name = "attention"
    else:
        name = "gkd" if g.method == "gkd" else "gkd+kd-logit"
    if name == "gkd+kd-logit":
        check_kd(kd.tau, kd.weighting, kd.alpha, kd.lam)
    built: dict[str, Any] = {}
    params: dict[str, Any] = {f"kd.{k}": v for k, v in kd.method_params().items()} if name == "gkd+kd-logit" else {}
    if teacher is not None:  # the distillation knobs, which runs without a teacher do not log
        params.update({f"gkd.{k}": v for k, v in g.method_params(teacher=True).items() if k in ("method", "beta", "gd_weight")})

    def make_step(model: nn.Module, num_train: int) -> nn.Module:
        net, cvae = build_gkd_net(model, clip.clip_len, clip.crop, g.variant, g.rescale, g.norm)
        term = None
        if name == "gkd+kd-logit":
            term = LogitKD(parts[0], tau=kd.tau, lam=kd.lam, weighting=kd.weighting, alpha=kd.alpha)
        step = GKDStep(net, cvae, g, cfg.optim.epochs, (clip.clip_len, clip.crop), *parts, kd=term,
                       steps_per_epoch=num_train // cfg.optim.batch_size)  # the train loader drops the last
        if step.adapter is not None:  # what aligns the student's feature with the teacher's, for the params
            params["gkd.adapter"] = step.adapter.describe()
        built["meta"] = {"arch": cfg.model.arch, "num_classes": model.num_classes, "width": cfg.model.width,
                         "modality": cfg.model.modality, "keep_time": cfg.model.keep_time, "clip_len": clip.clip_len,
                         "crop": clip.crop,
                         "variant": g.variant, "rescale": g.rescale, "norm": g.norm}
        return step

    def logged_state(step: nn.Module) -> dict[str, Any]:
        return {GKD_STATE: gkd_state(step.model, step.cvae, built["meta"])}

    tags = teacher_tags(name, teacher) if teacher is not None else {"method": name}
    tags["gkd_variant"] = g.variant
    ablation = "" if g.ablation == "none" else f"{g.ablation}-"
    if ablation:
        tags["gkd_ablation"] = g.ablation  # a row of its own in reports, beside the full method
    description = (f" With GKD's channel x time attention module ({g.variant}) and a CVAE, trained in two passes per "
                   f"epoch (CVAE, then network; regeneration weight ramped over {g.ramp:g} of the epochs)"
                   + (f"; distilled with {name} (beta {g.beta:g})" if teacher is not None else ", no teacher")
                   + (f"; ablation {g.ablation} (that term's weight is 0)." if ablation else "."))
    return Objective(
        name=name, make_step=make_step, params=params, tags=tags, teacher=teacher,
        # ad_loss is no soft term: it falls even when the student learns nothing (the accuracy rule judges gkd)
        soft_term="kd_loss" if name == "gkd+kd-logit" else None,
        # gkd and gkd+logit runs of one pair are told apart by name, as by pair_key
        name_prefix={"gkd": "gkd-", "gkd+kd-logit": "gkd+logit-"}.get(name, "att-") + ablation, description=description,
        logged_state=logged_state,
    )
