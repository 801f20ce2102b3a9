"""One factory from method names to a built objective, so the training loop never learns a method.

`build_objective` turns the run's configuration (`--ssl none|pcl`) and its teacher (or none) into an
`Objective`: how to wrap the student into a step module, the data view it trains on (single clips,
or PCL's clip tuples), the knobs to log, the tags that say what the run is, and what each batch
needs beyond the clip (cached teacher logits). Teacher handling, the logit cache and the views live
here and in the step modules, not in `kdhar.train`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdhar.config import RunConfig
from kdhar.methods import REGISTRY_LABELS
from kdhar.models.teacher import Teacher
from kdhar.objectives.kd import KDStep, LogitKD, check_kd
from kdhar.objectives.supervised import SupervisedStep

# Where a GKD model keeps what its exported graph drops (the CVAE), so that it can teach.
GKD_STATE = "gkd/state.pt"


@dataclass
class Objective:
    """A training method, built: everything `run_training` needs to know about it.

    Attributes:
        name: "supervised", "kd-logit", "pcl" (PCL with action CE), "pcl+kd-logit" or "pcl-ssl"
            (label-free PCL); the run's `method` tag.
        make_step: `make_step(model, num_train)` wraps the network being trained into a step module
            whose forward(x, y, **extra) returns {"loss", "output", ...named "*_loss" terms}, and
            optionally "target" (what "output" is scored against, default the labels) and
            "*_correct" counts (reported as "*_acc"); `num_train` is the training view's length.
        view: "clip" (single clips, `VideoClipDataset`) or "tuple" (`make_data` builds it).
        make_data: `make_data(index, seed, cache_bytes)`, the training dataset of a non-clip view;
            it may have `too_short` (videos left out).
        make_validation: `make_validation(index, seed)`, a fixed set that `step.validate` scores
            each epoch (logged as `<validation_prefix>_*`), or None.
        plateau_metric: the epoch metric the plateau schedule watches first (else the validation
            split's loss, else the training loss).
        selection_metric: the epoch metric, lowest best, that picks the run's best epoch (`best.pt`,
            the `sel_acc_*` stages) in place of the validation split's accuracy, or None.
        final_metrics: `final_metrics(model, cfg, splits, device)`, metrics of the trained model
            logged at the end (PCL: clip retrieval), or None.
        name_prefix, description: what run names and the run's description add for the method.
        labels: whether the run learns the action labels (False: label-free pretraining, which
            has no classifier to score).
        logged_state: `logged_state(step)`, {artifact path: object} logged with the model (GKD:
            the network and CVAE weights a teacher needs), or None.
        params: the method's knobs, logged as MLflow params (only those that act in this run).
        tags: what the run is (method, teacher run, cache key).
        teacher: the frozen teacher, if any (its classes are checked against the dataset).
        batch_extras: adds what a batch needs beyond the clip (cached teacher logits), or None.
        soft_term: the soft loss to a teacher's logits ("kd_loss") whose uniform-student level the step
            also reports (`kdhar.objectives.stuck.uniform_term`), or None; with it the stuck-run
            check (`is_stuck`) judges a distilled run before half its epochs are done.
    """

    name: str
    make_step: Callable[[nn.Module, int], nn.Module]
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    teacher: Teacher | None = None
    batch_extras: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None
    soft_term: str | None = None
    view: str = "clip"
    make_data: Callable[..., Any] | None = None
    make_validation: Callable[..., Any] | None = None
    validation_prefix: str = "ssl_val"
    plateau_metric: str | None = None
    selection_metric: str | None = None
    final_metrics: Callable[..., dict[str, float]] | None = None
    name_prefix: str = ""
    description: str = ""
    labels: bool = True
    logged_state: Callable[[nn.Module], dict[str, Any]] | None = None

    @property
    def registry_label(self) -> str:
        return REGISTRY_LABELS[self.name]

    @property
    def terms(self) -> tuple[str, ...]:
        """The loss terms this method logs (train_<term>), for reports and the tuner."""
        return METHOD_TERMS[self.name]


METHOD_TERMS = {
    "supervised": ("task_loss",),
    "kd-logit": ("task_loss", "kd_loss"),
    "pcl": ("pretext_loss", "nce0_loss", "nce2_loss", "ntxent_loss", "task_loss"),
    "pcl+kd-logit": ("pretext_loss", "nce0_loss", "nce2_loss", "ntxent_loss", "task_loss", "kd_loss"),
    "pcl-ssl": ("pretext_loss", "nce0_loss", "nce2_loss", "ntxent_loss"),
    # GKD: the net pass's terms, then the CVAE pass's (logged with a cvae_ prefix)
    "attention": ("task_loss", "rec_loss", "cvae_recon_loss", "cvae_kl_loss"),
    "gkd": ("task_loss", "rec_loss", "ad_loss", "align_loss", "cvae_recon_loss", "cvae_kl_loss", "cvae_gd_loss"),
    "gkd+kd-logit": ("task_loss", "kd_loss", "rec_loss", "ad_loss", "align_loss", "cvae_recon_loss", "cvae_kl_loss",
                     "cvae_gd_loss"),
    "kd-feature": ("task_loss", "hint_loss"),
}


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
    tags = _teacher_tags("kd-logit", teacher)
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


def _teacher_tags(method: str, teacher: Teacher) -> dict[str, str]:
    return {"method": method, "teacher_run_id": teacher.run_id or "", "teacher_uri": teacher.uri}


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

    tags = _teacher_tags(name, teacher) if teacher is not None else {"method": name}
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
    return Objective(name="kd-feature", make_step=make_step, params=params, tags=_teacher_tags("kd-feature", teacher),
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

    tags = _teacher_tags(name, teacher) if teacher is not None else {"method": name}
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
