"""Configuration dataclasses.

Defaults are the paper's (Camarena et al. 2024, Table 1) unless a comment says otherwise.
`CPU_PRESET` holds the overrides that make a run finish in minutes on a 2-core machine;
everything else is one parameter away from the paper's configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ClipConfig:
    """How clips are cut from a video and augmented."""

    clip_len: int = 16  # PCL's base clip length; Table 1 lists 10 and every model runs at both
    frame_interval: int = 1  # stride between sampled frames
    tuple_len: int = 3  # clips per tuple for the self-supervised order task
    test_clips: int = 10  # K evenly spaced clips per test video; video score = their mean
    resize: tuple[int, int] = (128, 171)  # (H, W) before cropping, as in C3D/PCL
    crop: int = 112  # square crop fed to the network
    augment: bool = True  # the paper's colour jitter/grayscale/blur/flip on training clips
    hflip: bool = True  # part of the paper's augmentation; wrong when classes are mirror images
    # half: (x - 0.5) / 0.5 per channel; imagenet: ImageNet's mean and std, as PCL's code (its runs' default)
    normalize: str = "half"


@dataclass(frozen=True)
class WindowConfig:
    """How untrimmed videos are cut into windows for temporal detection (GKD's detection code,
    after AFSD: 256-frame windows, stride 30 for training and 128 for testing)."""

    length: int = 256  # steps per window
    train_stride: int = 30  # frames between training windows: heavy overlap, many views of each segment
    test_stride: int = 128  # frames between test windows; one more window meets the video's end
    frame_interval: int = 1  # frames per step; AFSD reads THUMOS14 at 10 fps, 3 on its 30 fps videos
    min_inside: float = 0.5  # a training window keeps a segment when this share of it lies inside
    train_empty: bool = False  # keep training windows without a segment (AFSD leaves them out)


TASKS = ("recognition", "detection")
DET_NMS = ("soft", "hard")
DET_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class DetectionConfig:
    """The temporal detector's head, its optimiser, how its outputs become segments, and GKD's
    detection knob. Defaults follow GKD's detection code (after AFSD) where it has one."""

    head_channels: int = 64  # width of the 1-D head (kdhar.models.detector)
    reg_weight: float = 1.0  # weight of the 1-D GIoU loss beside the focal loss
    # GKD's detection code trains with Adam (betas 0.9, 0.999), not the recognition code's SGD;
    # every detection method of one comparison uses the same optimiser.
    optimizer: str = "adam"
    nms: str = "soft"  # soft: Gaussian soft-NMS, as GKD's and AFSD's THUMOS14 code; hard: NMS
    sigma: float = 0.5  # soft-NMS's Gaussian width
    iou_threshold: float = 0.5  # hard NMS only
    score_threshold: float = 0.001  # (step, class) scores below it propose no segment
    top_k: int = 200  # detections kept per video after suppression
    # GKD's background branch: the head on F*(1-A)/sum(1-A) learns the gaps between the actions as
    # background, weighted x35 in the detection code. Acts only with the attention module.
    bg_weight: float = 35.0

    def method_params(self, attention: bool) -> dict[str, Any]:
        """The knobs that act (logged as det.*): the background weight only with attention."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "bg_weight"}
        if attention:
            out["bg_weight"] = self.bg_weight
        return out


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, split and subset to use."""

    dataset: str = "ucf101"  # ucf101 | hmdb51 | folder
    root: str = "data/synthetic/ucf101"  # embedded default: written by `kdhar data synth`
    split: int = 1  # official splits 1-3 (SPLITS)
    split_dir: str = ""  # folder of the split files when not in root (or, for UCF101, beside it)
    fraction: float = 1.0  # class-balanced share of the training videos (paper: 1, .5, .25, .02)
    val_fraction: float = 0.1  # share of training groups held out for validation/tuning
    on_missing: str = "error"  # error | skip: listed videos absent on disk
    on_bad: str = "error"  # error | skip: undecodable videos
    num_workers: int = 2  # DataLoader workers (each opens its own decord reader)
    # 0: a fresh augmented view of every training video each epoch. N > 0: epoch e replays view
    # e % N, which a teacher-logit cache needs; a KD run and its scratch twin must use the same N.
    views: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and its size knobs."""

    arch: str = "c3d"
    width: int = 64  # base channel count; 64 is the published size
    dropout: float = 0.5
    # "rgb", or "res": residual frames (x[t-1] - x[t]), the input of PCL and of the KD paper's
    # students; computed inside the model, so a logged model carries it.
    modality: str = "rgb"
    # The trunk's last temporal downsamplings left out (kdhar.models.temporal), so its last feature
    # keeps a time axis: at 8 frames, 2 keeps T' = 4 in C3D and the ResNets (T' = 1 as published).
    keep_time: int = 0


SPLITS = (1, 2, 3)  # the official train/test splits of UCF101 and HMDB51; folder datasets cut three too
MODALITIES = ("rgb", "res")  # what ModelConfig.modality may be; kdhar.models computes "res"
NORMALIZE = ("half", "imagenet")  # what ClipConfig.normalize may be; kdhar.data.transforms holds the values


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule (Table 1)."""

    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 16
    epochs: int = 200
    schedule: str = "cosine"  # cosine | step | constant | plateau (PCL's ReduceLROnPlateau, see engine.Plateau)
    seed: int = 0
    deterministic: bool = True
    # Linear warm-up from 0 to lr over this many epochs (fractions allowed). The paper uses none, but
    # without it the KD term's early gradient knocked small students into a constant output at the
    # CE-tuned lr (README, "Choosing the KD defaults"); one epoch costs scratch runs nothing measurable.
    warmup: float = 1.0
    grad_clip: float = 0.0  # max gradient L2 norm per step; 0 = no clipping
    # torch CPU threads. Results are bit-identical only for the same thread count (and torch build),
    # so it is pinned rather than left to torch's per-machine default, and recorded with the run.
    threads: int = 2
    # Under torchrun: BatchNorm statistics over the whole global batch (SyncBatchNorm, CUDA only)
    # rather than each process's share of it.
    sync_bn: bool = False
    # schedule "plateau": a new minimum must beat the best by this share (ReduceLROnPlateau's default
    # relative threshold, which PCL's code keeps); 0 counts any decrease.
    plateau_threshold: float = 1e-4
    # schedule "plateau": epochs without a new minimum before the lr drops x0.1 (PCL's Table 1: 50;
    # its fine-tuning code: 30)
    plateau_patience: int = 50


KD_WEIGHTINGS = ("mix", "sum", "balanced")


@dataclass(frozen=True)
class KDConfig:
    """Logit distillation (Hinton et al.), as used by the paper.

    weighting "mix": (1 - alpha) * CE + alpha * tau^2 * KL. "sum": CE + lam * tau^2 * KL, the paper's
    Eq. 7. Neither is scale-neutral at tau 4: the soft term's gradient is about 2x CE's at init and
    2.3-2.4x after a few epochs (benchmarks/bench_kd_grad_scale.py), so under "mix" at alpha 0.5 the
    total gradient is 1.5-1.7x plain CE's and under "sum" about 3x, both at the CE-tuned lr. Under
    "sum" without warm-up that collapsed width-4 students on a 3-epoch cell (README).
    "balanced": "mix" with the soft term rescaled, per batch, so that its gradient at the student's
    logits is as large as CE's (`objectives.kd.balance_scale`, kept between 1/tau^2 and 1); at alpha
    0.5 the step is then about plain CE's. Which weighting is the default is decided by measured runs,
    not by this argument: on the CPU grid (experiments/cpu.yaml and cpu-loss.yaml, 20 paired seeds,
    docs/cpu_grid_report.md) "sum" ended 15-31 points below "mix" in all four cells and stalled in 69
    of its 160 runs, so "mix" is the default. `--kd-weighting sum --warmup 0` is the paper's recipe.
    """

    tau: float = 4.0  # the paper's temperature
    weighting: str = "mix"  # mix | sum | balanced (see the class docstring)
    alpha: float = 0.5  # weight of the soft term under "mix" and "balanced", in [0, 1]
    lam: float = 1.0  # weight of the soft term under "sum" (the paper's lambda)

    def method_params(self) -> dict[str, Any]:
        """Only the knobs that act under this weighting (what a run logs as kd.*)."""
        weight = {"lam": self.lam} if self.weighting == "sum" else {"alpha": self.alpha}
        return {"tau": self.tau, "weighting": self.weighting, **weight}


SSL_METHODS = ("none", "pcl")
# The KD weighting of PCL runs unless one is given: the paper's Eq. 7, CE + lambda * KD (lambda 1).
PCL_KD_WEIGHTING = "sum"


def default_kd_weighting(ssl: str = "none", kd_stage: str = "during_ssl") -> str:
    """The KD weighting a run takes unless told: Eq. 7 (sum) for a student distilled inside PCL,
    mix for every other (a `kd_stage` "after_ssl" student distils supervised, from its pretraining)."""
    return PCL_KD_WEIGHTING if ssl == "pcl" and kd_stage != "after_ssl" else KDConfig.weighting


CONTRASTS = ("nce", "ntxent")
# PCL's choices. The data and model code that acts on them imports them from here, so checking a
# configuration needs nothing above this module.
STRIDES = ("upstream", "nominal")  # clip_stride: see kdhar.data.tuples.TupleLayout
SPATIAL_PERMS = ("fixed", "random")  # spatial_perm: see kdhar.data.pretext
SWAP_PAIRS = ("any", "adjacent")  # swap_pairs: see kdhar.data.pretext
RETRIEVAL_POOLS = ("floor", "ceil")  # retrieval_pool: see kdhar.retrieval.clip_feature


@dataclass(frozen=True)
class PCLConfig:
    """Pretext-Contrastive Learning (../shared/methods/pcl.md), the KD paper's training regime.

    `ssl` "pcl" trains on clip tuples: the 5-way pretext task on the middle clip plus the contrastive
    term over the first and last clips, and (for students) the action CE and KD on those two clips.
    Defaults are the public PCL code's, which the paper ran (Table 1 matches its argparse defaults).
    """

    ssl: str = "none"  # none | pcl
    interval: int = 8  # Table 1's "interval 8" between the tuple's clips
    clip_stride: str = "upstream"  # upstream: clips (tuple_len + interval) apart, as the code; nominal: clip_len + interval
    spatial_perm: str = "fixed"  # fixed: quadrants as [[D, C], [B, A]] (code); random: any non-identity order (prose)
    swap_pairs: str = "any"  # any two of the four temporal chunks (code) | adjacent ones only (prose)
    contrast: str = "nce"  # nce: two memory banks, K negatives (code) | ntxent: in-batch (not upstream)
    contrast_weight: float = 0.5  # Table 1's "weight contrastive loss"
    negatives: int = 1024  # K, drawn with replacement from the bank
    temperature: float = 0.07
    momentum: float = 0.5  # memory-bank update
    # Projector and contrastive logits in float32 under autocast, as upstream (trained in float32);
    # false: bf16 on CUDA, whose logits near 1/0.07 = 14 come in steps of 1/16.
    fp32_logits: bool = True
    # Retrieval features: floor is upstream's MaxPool3d((1, 2, 2)) (9,216-d for R3D at 112x112);
    # ceil keeps an odd last row and column (16,384-d there).
    retrieval_pool: str = "floor"

    def method_params(self) -> dict[str, Any]:
        """The knobs that act (what a PCL run logs as pcl.*); none for a run without PCL."""
        if self.ssl == "none":
            return {}
        out = {k: getattr(self, k) for k in ("ssl", "interval", "clip_stride", "spatial_perm", "swap_pairs", "contrast",
                                             "contrast_weight", "temperature", "fp32_logits", "retrieval_pool")}
        if self.contrast == "nce":
            out.update(negatives=self.negatives, momentum=self.momentum)
        return out


FINETUNE_PROTOCOLS = ("plain", "pcl")


@dataclass(frozen=True)
class FinetuneConfig:
    """How a fine-tune trains and which of its epochs it reports (`kdhar finetune --protocol`).

    "plain": as any supervised run of its size (its schedule, augmentation and warm-up), the last
    epoch reported. "pcl": the public PCL code's `ft_classify.py` (../shared/methods/pcl.md §5.3), the
    default for a model trained inside PCL: `PCL_FINETUNE_PRESET` on top of the size preset
    (no colour augmentation or flip, no warm-up, ReduceLROnPlateau on the validation loss with
    patience 30; at the paper's size also SGD at lr 1e-3, batch 8, 150 epochs), and the epoch of
    lowest validation loss selects (`best.pt`, `sel_acc_*`: that epoch's test accuracy, what
    upstream reports), beside the last epoch's (`final_test_*`).
    """

    protocol: str = "plain"

    def method_params(self) -> dict[str, Any]:
        """What a fine-tune logs as finetune.*: nothing for "plain", so other runs keep their identity."""
        return {} if self.protocol == "plain" else {"protocol": self.protocol}


KD_METHODS = ("logit", "feature", "gkd", "gkd+logit")
GKD_METHODS = ("gkd", "gkd+logit")  # the --kd choices that distil through GKD's attention module
# GKD's ablations (`--gkd-ablation`): each turns one term of a distilled run off. "ad-only": no
# generative distillation (GD) in the CVAE pass; "gd-only": no attention distillation (AD) in the
# network pass; "no-rec": no regeneration loss in the network pass (the CVAE then shapes nothing).
GKD_ABLATIONS = ("none", "ad-only", "gd-only", "no-rec")
GKD_VARIANTS = ("faithful", "light")
GKD_NORMS = ("values", "channels")
GKD_CE = ("mean", "sum-softmax")
GKD_RESCALES = ("sample", "batch")


@dataclass(frozen=True)
class GKDConfig:
    """Generative feature distillation (GKD, AAAI-24; ../shared/methods/gkd.md) and its attention module.

    `method` is the `--kd` choice: "logit" (Hinton KD on the logits), "feature" (FitNets-style hint
    loss on the last feature, `FeatureKDConfig`), "gkd" (attention and generative distillation) or
    "gkd+logit" (both). `attention` gives the network the channel x time attention
    head (its classifier reads the attended feature) and a CVAE, trained in two passes per epoch (the
    CVAE, then the network): a GKD teacher (`train-teacher --attention`), every GKD student, and,
    without a teacher, the "scratch + attention module" baseline. The knobs only act (and are only
    logged) when `attention` is on; `beta` and `gd_weight` only with a teacher.
    """

    method: str = "logit"
    attention: bool = False
    variant: str = "faithful"  # faithful: the paper's layers scaled to C; light: pooled space, 1x1 convs
    beta: float = 0.1  # weight of attention distillation MSE(A_s, A_t) (recognition code)
    # Share of the epochs over which the regeneration weight ramps up linearly (the paper's 20 of 200
    # epochs is 0.1; its phase 1 ramps over the whole run, 1.0, the teacher's default).
    ramp: float = 0.1
    rec_weight: float = 0.5  # weight of the regeneration loss once ramped
    gd_weight: float = 0.01  # weight of generative distillation in the CVAE pass (hard-coded upstream)
    cvae_lr: float = 1e-4  # Adam, betas (0.8, 0.999); phase 1 (teachers) uses 1e-3
    ce: str = "mean"  # mean: CE on time-averaged logits; sum-softmax: the code's CE on summed softmax
    rescale: str = "sample"  # sample: per-sample activation-mass rescale; batch: the code's batch-global one
    # GroupNorm groups: "values" keeps >= 16 values per group (the code's 32 groups at its I3D shape);
    # "channels" is gcd(C, 32), which at CPU widths and T' = 1 makes the attention a constant.
    norm: str = "values"
    ablation: str = "none"  # one of GKD_ABLATIONS: a term turned off (see there)

    @property
    def distils(self) -> bool:
        """Whether a run with a teacher distils through the attention module (gkd, gkd+logit)."""
        return self.method in GKD_METHODS

    def weights(self) -> dict[str, float]:
        """The weights a GKD step uses, {"beta", "gd_weight", "rec_weight"}, with the ablation's term at 0."""
        off = {"ad-only": "gd_weight", "gd-only": "beta", "no-rec": "rec_weight"}.get(self.ablation)
        return {k: 0.0 if k == off else float(getattr(self, k)) for k in ("beta", "gd_weight", "rec_weight")}

    def method_params(self, teacher: bool) -> dict[str, Any]:
        """The knobs that act (logged as gkd.*): none without the attention module."""
        if not self.attention:
            return {}
        out = {k: getattr(self, k) for k in ("variant", "ramp", "rec_weight", "cvae_lr", "ce", "rescale", "norm")}
        if self.ablation != "none":  # logged only when set, so runs without one keep their identity
            out["ablation"] = self.ablation
        if teacher and self.distils:
            out.update(method=self.method, beta=self.beta, gd_weight=self.gd_weight)
        return out


@dataclass(frozen=True)
class FeatureKDConfig:
    """Feature KD (`--kd feature`), the FitNets-style baseline a feature-distillation method is compared
    with: CE plus `weight` x the mean squared error between the student's last feature, mapped to the
    teacher's shape by a learned 1 x 1 x 1 convolution and resizing (the regressor), and the frozen
    teacher's last feature. Trained jointly, in one stage (FitNets trains the hint first)."""

    weight: float = 1.0

    def method_params(self) -> dict[str, Any]:
        return {"weight": self.weight}


# Overrides for a 2-core CPU: small clips, narrow networks, few epochs; measured on the synthetic
# set (see README). The synthetic videos are 128x96 and 32 frames long, so a 64x85 resize keeps
# their aspect ratio and 8 frames 4 apart cover the whole action (so one test clip per video
# sees everything K clips would). At width 8, SGD at lr 0.01 with
# dropout 0.5 stayed at chance for 10+ epochs; lr 0.02 without dropout leaves the plateau in ~3.
# The paper's photometric augmentation held a width-8 C3D at 54 % test accuracy after 12 epochs,
# against 75 % without it, so the CPU preset trains on plain clips (`--augment true` restores it).
# The synthetic set has mirror-image classes (SlideLeft/SlideRight), so flips are off.
CPU_PRESET: dict[str, dict[str, Any]] = {
    "clip": {"clip_len": 8, "frame_interval": 4, "test_clips": 1, "resize": (64, 85), "crop": 56, "hflip": False, "augment": False},
    "model": {"width": 8, "dropout": 0.0},
    "optim": {"batch_size": 16, "epochs": 12, "lr": 0.02},
}
# On top of CPU_PRESET for PCL runs. PCL's clips are consecutive frames (no subsampling); three
# 8-frame clips at interval 2 need videos of 28 frames (VCOP's rule; the paper's interval 8 needs 40)
# and, at upstream's stride, start 5 apart, sharing 3 frames (README, "How far apart the clips are"). Test clips are cut the same way, 3 per video to cover it. Those 32 frames
# leave no room for a remote clip (label 4 needs 2 x (8 + 16) frames beside the tuple), so at this
# size the pretext task is 4-way; `kdhar data synth --frames 96` makes videos that allow it.
# For PCL runs at the paper's size: Table 1's clip length (the ClipConfig default 16 is PCL's code's).
# Its schedule too: ReduceLROnPlateau on the self-supervised validation loss, no warm-up.
# At both sizes, PCL's code's protocol: every training video trains (no validation hold-out: the
# self-supervised validation loss on the test list selects), ImageNet normalisation, no warm-up
# (the paper's Eq. 7 runs from the first step).
PCL_PROTOCOL: dict[str, dict[str, Any]] = {"data": {"val_fraction": 0.0}, "clip": {"normalize": "imagenet"},
                                           "optim": {"warmup": 0.0}}
PCL_PAPER_PRESET: dict[str, dict[str, Any]] = {"data": PCL_PROTOCOL["data"],
                                               "clip": {**PCL_PROTOCOL["clip"], "clip_len": 10},
                                               "optim": {**PCL_PROTOCOL["optim"], "schedule": "plateau"}}
PCL_CPU_PRESET: dict[str, dict[str, Any]] = {
    "data": PCL_PROTOCOL["data"],
    "clip": {**PCL_PROTOCOL["clip"], "frame_interval": 1, "test_clips": 3},
    "optim": PCL_PROTOCOL["optim"],
    "pcl": {"interval": 2},
}
# PCL's fine-tuning (`FinetuneConfig` "pcl"; its code's ft_classify.py), on top of the size preset:
# one random crop per video with no colour augmentation and no flip, no warm-up, the lr x0.1 after
# 30 epochs without a lower validation loss (min 1e-5). At the paper's size also its SGD: lr 1e-3,
# momentum 0.9, weight decay 5e-4, batch 8, 150 epochs. At size cpu the CPU preset's lr, batch and
# epochs stay (1e-3 leaves a 12-epoch run near chance) and the patience keeps upstream's share of
# the epochs (30 of 150: 2 of 12).
_PCL_FINETUNE: dict[str, dict[str, Any]] = {"clip": {"augment": False, "hflip": False},
                                             "optim": {"schedule": "plateau", "warmup": 0.0}}
PCL_FINETUNE_PRESET: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"clip": _PCL_FINETUNE["clip"],
              "optim": {**_PCL_FINETUNE["optim"], "plateau_patience": 30, "lr": 1e-3, "momentum": 0.9,
                        "weight_decay": 5e-4, "batch_size": 8, "epochs": 150}},
    "cpu": {"clip": _PCL_FINETUNE["clip"], "optim": {**_PCL_FINETUNE["optim"], "plateau_patience": 2}},
}
# GKD's recipe, per size: what every student of a grid with `recipe: gkd` trains with (scratch,
# scratch + attention, logit KD, feature KD and GKD alike, so that they are matched twins), its
# teachers too, and any single run with the attention module. At the paper's size it is the
# recognition code's SGD at lr 1e-3, no schedule, no warm-up, batch 6. At size cpu the network keeps
# the CPU preset's SGD (lr 1e-3 without a schedule leaves a 12-epoch run at chance) and its trunk
# keeps a time axis: leaving out the last two temporal downsamplings keeps T' = 4 of the 8 frames in
# C3D and the ResNets (T' = 1 as published, where a channel x time attention has no time to attend
# to; tiny3d and MC3-18 keep T' = 8), as the paper's I3D keeps T' = 8 of 64 frames.
GKD_RECIPE: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"optim": {"lr": 1e-3, "schedule": "constant", "warmup": 0.0, "batch_size": 6}},
    "cpu": {"model": {"keep_time": 2}},
}
# The attention module's own settings, only for runs that have it (twins without it have no CVAE):
# at size cpu the CVAE's Adam runs at phase 1's 1e-3, since a run has a few dozen CVAE steps per
# epoch, not the paper's thousands.
GKD_MODULE_PRESET: dict[str, dict[str, dict[str, Any]]] = {"paper": {}, "cpu": {"gkd": {"cvae_lr": 1e-3}}}
# A grid's `recipe`: "gkd" gives every cell GKD_RECIPE (the default of a grid with a GKD method);
# "preset" gives none of them it, the size preset alone (the default otherwise).
RECIPES = ("preset", "gkd")
# Temporal detection at the paper's size: GKD's detection code (after AFSD): 256-frame windows of
# 96x96 crops from frames resized to 112x112, stride 30 for training and 128 for testing, Adam at
# lr 1e-6 with weight decay 1e-3, batch 1, 50 epochs, no schedule; GKD's beta is 10 there.
DET_PAPER_PRESET: dict[str, dict[str, Any]] = {
    "window": {"length": 256, "train_stride": 30, "test_stride": 128, "frame_interval": 1},
    "clip": {"resize": (112, 112), "crop": 96},
    "optim": {"lr": 1e-6, "weight_decay": 1e-3, "batch_size": 1, "epochs": 50, "schedule": "constant", "warmup": 0.0},
    "gkd": {"beta": 10.0},
}
# On two cores: 128-step windows of 2 frames a step (the same 256 frames as the paper's windows), so
# C3D's and the ResNets' taps keep 32 and 16 steps and tiny3d's 64 and 32; 48x48 crops of 55x73
# frames (the synthetic videos' 4:3, as the CPU preset's rule for a crop gives), windows every 64 frames for training, width-8 trunks, a
# 32-wide head, Adam at 1e-3 (1e-6 is for the paper's hundreds of thousands of steps). Measured on
# the synthetic untrimmed set (README).
DET_CPU_PRESET: dict[str, dict[str, Any]] = {
    "window": {"length": 128, "train_stride": 64, "test_stride": 128, "frame_interval": 2},
    "clip": {"resize": (55, 73), "crop": 48, "hflip": False, "augment": False},
    "model": {"width": 8, "dropout": 0.0},
    "optim": {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 4, "epochs": 12, "schedule": "cosine", "warmup": 0.0},
    "det": {"head_channels": 32},
    # GKD's detection beta; the CVAE's Adam at phase 1's 1e-3, as recognition's CPU preset (a CPU run
    # makes tens of CVAE steps an epoch)
    "gkd": {"beta": 10.0, "cvae_lr": 1e-3},
}


def check_run_config(cfg: RunConfig) -> None:
    """Refuses values no run can train with, naming the knob (the option and spec key of the same
    name) and the allowed range, before any data is read.

    Raises:
        ValueError: the first bad value.
    """
    import math

    o, c, d, m = cfg.optim, cfg.clip, cfg.data, cfg.model

    def need(ok: bool, name: str, value: Any, rule: str) -> None:
        if not ok:
            raise ValueError(f"{name}={value!r}: {rule}")

    def finite(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    need(finite(o.lr) and o.lr > 0, "lr", o.lr, "must be a finite number > 0, e.g. 0.01")
    need(finite(o.momentum) and 0 <= o.momentum < 1, "momentum", o.momentum, "must be in [0, 1)")
    need(finite(o.weight_decay) and o.weight_decay >= 0, "weight_decay", o.weight_decay, "must be a finite number >= 0")
    need(o.epochs >= 1, "epochs", o.epochs, "must be at least 1")
    need(o.batch_size >= 1, "batch_size", o.batch_size, "must be at least 1")
    need(finite(o.warmup) and o.warmup >= 0, "warmup", o.warmup, "must be a finite number of epochs >= 0")
    need(finite(o.grad_clip) and o.grad_clip >= 0, "grad_clip", o.grad_clip, "must be >= 0 (0 turns clipping off)")
    need(finite(o.plateau_threshold) and 0 <= o.plateau_threshold < 1, "plateau_threshold", o.plateau_threshold,
         "must be in [0, 1) (ReduceLROnPlateau's default: 1e-4)")
    need(isinstance(o.plateau_patience, int) and o.plateau_patience >= 0, "plateau_patience", o.plateau_patience,
         "must be a whole number of epochs >= 0")
    need(o.threads >= 1, "threads", o.threads, "must be at least 1")
    need(m.width >= 1, "width", m.width, "must be at least 1")
    need(finite(m.dropout) and 0 <= m.dropout < 1, "dropout", m.dropout, "must be in [0, 1)")
    need(m.modality in MODALITIES, "modality", m.modality, f"must be one of {', '.join(MODALITIES)}")
    need(m.keep_time >= 0, "keep_time", m.keep_time, "must be >= 0 (the trunk's last temporal downsamplings left out)")
    need(c.clip_len >= 1, "clip_len", c.clip_len, "must be at least 1 frame")
    need(c.frame_interval >= 1, "frame_interval", c.frame_interval, "must be at least 1")
    need(c.test_clips >= 1, "test_clips", c.test_clips, "must be at least 1")
    need(c.crop >= 1, "crop", c.crop, "must be at least 1 pixel")
    need(c.normalize in NORMALIZE, "normalize", c.normalize, f"must be one of {', '.join(NORMALIZE)}")
    if c.resize is not None:
        need(c.crop <= min(c.resize), "crop", c.crop,
             f"must fit in the {c.resize[0]}x{c.resize[1]} frames it is cut from (resize); lower --crop")
    need(d.num_workers >= 0, "num_workers", d.num_workers, "must be >= 0")
    need(d.views >= 0, "views", d.views, "must be >= 0 (0 = a new view every epoch)")
    need(finite(d.fraction) and 0 < d.fraction <= 1, "fraction", d.fraction, "must be in (0, 1]")
    _check_pcl(cfg, need, finite)
    _check_kd(cfg, need, finite)
    _check_finetune(cfg, need)
    need(cfg.task in TASKS, "task", cfg.task, f"must be one of {', '.join(TASKS)}")
    if cfg.task == "detection":
        _check_detection(cfg, need, finite)


def _check_pcl(cfg: RunConfig, need: Any, finite: Any) -> None:
    """The self-supervised knobs, and what PCL's pretext task asks of the clips."""
    c = cfg.clip
    p = cfg.pcl
    need(p.ssl in SSL_METHODS, "ssl", p.ssl, f"must be one of {', '.join(SSL_METHODS)}")
    if p.ssl == "pcl":
        need(p.interval >= 0, "pcl_interval", p.interval, "must be >= 0 frames")
        need(p.clip_stride in STRIDES, "clip_stride", p.clip_stride, f"must be one of {', '.join(STRIDES)}")
        need(p.spatial_perm in SPATIAL_PERMS, "spatial_perm", p.spatial_perm, f"must be one of {', '.join(SPATIAL_PERMS)}")
        need(p.swap_pairs in SWAP_PAIRS, "swap_pairs", p.swap_pairs, f"must be one of {', '.join(SWAP_PAIRS)}")
        need(p.contrast in CONTRASTS, "contrast", p.contrast, f"must be one of {', '.join(CONTRASTS)}")
        need(finite(p.contrast_weight) and p.contrast_weight >= 0, "contrast_weight", p.contrast_weight, "must be >= 0")
        need(p.negatives >= 1, "negatives", p.negatives, "must be at least 1")
        need(finite(p.temperature) and p.temperature > 0, "nce_temperature", p.temperature, "must be > 0 (upstream: 0.07)")
        need(finite(p.momentum) and 0 <= p.momentum < 1, "bank_momentum", p.momentum, "must be in [0, 1)")
        need(p.retrieval_pool in RETRIEVAL_POOLS, "retrieval_pool", p.retrieval_pool,
             f"must be one of {', '.join(RETRIEVAL_POOLS)}")
        need(c.crop % 2 == 0, "crop", c.crop, "must be even for the quadrant permutation of PCL's pretext task")
        size = -(-c.clip_len // 4)
        need(-(-c.clip_len // size) == 4, "clip_len", c.clip_len,
             "torch.chunk must split it into 4 temporal chunks for PCL's chunk swap (e.g. 8, 10 or 16)")


def _check_finetune(cfg: RunConfig, need: Any) -> None:
    """The fine-tuning protocol, and the validation split PCL's one selects and schedules by."""
    f = cfg.finetune
    need(f.protocol in FINETUNE_PROTOCOLS, "protocol", f.protocol, f"must be one of {', '.join(FINETUNE_PROTOCOLS)}")
    if f.protocol == "pcl":
        need(cfg.data.val_fraction > 0, "val_fraction", cfg.data.val_fraction,
             "PCL's fine-tuning drops its lr and picks its epoch by the validation loss: give --val-fraction > 0 "
             "(default 0.1), or --protocol plain")
        need(cfg.pcl.ssl == "none", "ssl", cfg.pcl.ssl, "a fine-tune is supervised: leave --ssl pcl out")


def _check_kd(cfg: RunConfig, need: Any, finite: Any) -> None:
    """The distillation method's knobs: feature KD's, GKD's, and what each combines with."""
    p = cfg.pcl
    g = cfg.gkd
    need(g.method in KD_METHODS, "kd", g.method, f"must be one of {', '.join(KD_METHODS)}")
    need(finite(cfg.feature.weight) and cfg.feature.weight >= 0, "feature_weight", cfg.feature.weight,
         "must be >= 0 (the hint loss's weight, default 1)")
    if g.method == "feature":
        need(not g.attention, "kd", g.method, "trains the plain student, without GKD's attention module: leave "
             "attention out")
        need(p.ssl == "none", "ssl", p.ssl, "feature KD trains on single clips: leave --ssl pcl out")
    if g.attention:
        need(g.variant in GKD_VARIANTS, "gkd_variant", g.variant, f"must be one of {', '.join(GKD_VARIANTS)}")
        need(g.ce in GKD_CE, "gkd_ce", g.ce, f"must be one of {', '.join(GKD_CE)}")
        need(g.rescale in GKD_RESCALES, "gkd_rescale", g.rescale, f"must be one of {', '.join(GKD_RESCALES)}")
        need(g.norm in GKD_NORMS, "gkd_norm", g.norm, f"must be one of {', '.join(GKD_NORMS)}")
        need(g.ablation in GKD_ABLATIONS, "gkd_ablation", g.ablation, f"must be one of {', '.join(GKD_ABLATIONS)}")
        need(finite(g.beta) and g.beta >= 0, "gkd_beta", g.beta, "must be >= 0 (the paper: 0.1)")
        need(finite(g.ramp) and 0 < g.ramp <= 1, "gkd_ramp", g.ramp, "must be a share of the epochs in (0, 1] (the paper: 0.1)")
        need(finite(g.rec_weight) and g.rec_weight >= 0, "gkd_rec_weight", g.rec_weight, "must be >= 0 (the paper: 0.5)")
        need(finite(g.gd_weight) and g.gd_weight >= 0, "gkd_gd_weight", g.gd_weight, "must be >= 0 (the paper: 0.01)")
        need(finite(g.cvae_lr) and g.cvae_lr > 0, "cvae_lr", g.cvae_lr, "must be > 0 (the paper: 1e-4)")
        need(p.ssl == "none", "ssl", p.ssl, "GKD's attention module trains on single clips: leave --ssl pcl out")
    elif g.method in GKD_METHODS:
        need(False, "kd", g.method, "needs the attention module (attention: true), which --kd gkd turns on")
    else:
        need(g.ablation == "none", "gkd_ablation", g.ablation, "turns off a term of GKD: use it with --kd gkd")


def _check_detection(cfg: RunConfig, need: Any, finite: Any) -> None:
    """The window and head knobs of a detection run, and what detection does not combine with."""
    w, d, g = cfg.window, cfg.det, cfg.gkd
    need(w.length >= 1, "window_length", w.length, "must be at least 1 step")
    need(w.frame_interval >= 1, "frame_interval", w.frame_interval, "must be at least 1 frame per step")
    extent = w.length * w.frame_interval
    for name, stride in (("train_stride", w.train_stride), ("test_stride", w.test_stride)):
        need(1 <= stride <= extent, name, stride,
             f"must be between 1 and the window's {extent} frames, or frames fall between windows")
    need(finite(w.min_inside) and 0 < w.min_inside <= 1, "min_inside", w.min_inside, "must be in (0, 1]")
    need(d.head_channels >= 1, "head_channels", d.head_channels, "must be at least 1")
    need(finite(d.reg_weight) and d.reg_weight >= 0, "reg_weight", d.reg_weight, "must be >= 0")
    need(d.optimizer in DET_OPTIMIZERS, "det_optimizer", d.optimizer, f"must be one of {', '.join(DET_OPTIMIZERS)}")
    need(d.nms in DET_NMS, "nms", d.nms, f"must be one of {', '.join(DET_NMS)}")
    need(finite(d.sigma) and d.sigma > 0, "nms_sigma", d.sigma, "must be > 0 (soft-NMS's Gaussian width, e.g. 0.5)")
    need(finite(d.iou_threshold) and 0 < d.iou_threshold <= 1, "nms_iou", d.iou_threshold, "must be in (0, 1]")
    need(finite(d.score_threshold) and 0 <= d.score_threshold < 1, "score_threshold", d.score_threshold, "must be in [0, 1)")
    need(d.top_k >= 1, "top_k", d.top_k, "must be at least 1")
    need(finite(d.bg_weight) and d.bg_weight >= 0, "bg_weight", d.bg_weight, "must be >= 0 (GKD's detection code: 35)")
    need(cfg.pcl.ssl == "none", "ssl", cfg.pcl.ssl, "PCL trains on clip tuples; a detector trains on windows")
    need(g.method in ("logit", "gkd"), "kd", g.method, "detection distils with --kd logit (per-step scores) or gkd")
    need(g.ablation == "none", "gkd_ablation", g.ablation, "is recognition's: detection's GKD keeps every term")
    need(cfg.model.keep_time == 0, "keep_time", cfg.model.keep_time,
         "is recognition's: a detector reads its trunk's taps, which keep their time axes")


def with_overrides(obj: Any, **changes: Any) -> Any:
    """Returns a copy of a frozen dataclass with the non-None values of `changes` applied."""
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if v is not None})


def to_params(**sections: Any) -> dict[str, Any]:
    """Flattens dataclasses into `section.field` -> value, the form MLflow params take."""
    out: dict[str, Any] = {}
    for name, obj in sections.items():
        for f in dataclasses.fields(obj):
            out[f"{name}.{f.name}"] = getattr(obj, f.name)
    return out


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; built by the CLI, consumed by `kdhar.train`."""

    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    pcl: PCLConfig = field(default_factory=PCLConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    # "recognition" (clips, a classifier) or "detection" (windows of untrimmed videos, a temporal
    # detector); `window` and `det` act only for detection.
    task: str = "recognition"
    window: WindowConfig = field(default_factory=WindowConfig)
    det: DetectionConfig = field(default_factory=DetectionConfig)
    feature: FeatureKDConfig = field(default_factory=FeatureKDConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # acts for fine-tunes only

    def params(self, kd: bool = True) -> dict[str, Any]:
        """`section.field` -> value; kd=False leaves the distillation knobs out (runs without a teacher),
        and only the KD knobs that act under the chosen weighting are listed. PCL knobs appear only
        for PCL runs, and the task, window and detector knobs only for detection runs, so the
        identity of every other run is unchanged."""
        out = to_params(data=self.data, clip=self.clip, model=self.model, optim=self.optim)
        out.update({f"pcl.{k}": v for k, v in self.pcl.method_params().items()})
        out.update({f"gkd.{k}": v for k, v in self.gkd.method_params(teacher=kd).items()})
        out.update({f"finetune.{k}": v for k, v in self.finetune.method_params().items()})
        if self.task == "detection":
            out["task"] = self.task
            out.update(to_params(window=self.window))
            out.update({f"det.{k}": v for k, v in self.det.method_params(self.gkd.attention).items()})
            if kd and self.gkd.method == "logit":  # score distillation: CE-free, so tau and lam only
                out.update({"kd.tau": self.kd.tau, "kd.lam": self.kd.lam})
            return out
        if kd and self.gkd.method in ("logit", "gkd+logit"):  # GKD and feature KD alone use no logit-KD knob
            out.update({f"kd.{k}": v for k, v in self.kd.method_params().items()})
        if kd and self.gkd.method == "feature":
            out.update({f"feature.{k}": v for k, v in self.feature.method_params().items()})
        return out
