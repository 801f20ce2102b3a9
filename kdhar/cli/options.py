"""Options shared by commands: the run options (MLproject parameters of the same names), the KD,
PCL and GKD knobs, the data-parallel launcher's options, the parameter types that read MLproject's
empty values, and `build_config`, which turns them into a checked run configuration."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import click

from kdhar import config as C
from kdhar.cli.errors import UserError

DEFAULT_ROOT = "data/synthetic/ucf101"
DEFAULT_HMDB_ROOT = "data/synthetic/hmdb51"
DEFAULT_TAD_ROOT = "data/synthetic/thumos14"  # untrimmed videos for temporal detection


class _Optional(click.ParamType):
    """int/float where "" means "not given": MLproject passes every parameter, empty or not."""

    def __init__(self, kind: type):
        self.kind, self.name = kind, kind.__name__

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, self.kind):
            return value
        text = str(value).strip()
        if text in ("", "None"):
            return None
        try:
            number = float(text)
        except ValueError:
            self.fail(f"{value!r} is not a number", param, ctx)
        if self.kind is int:
            if not number.is_integer():
                self.fail(f"{value!r} is not a whole number", param, ctx)
            return int(number)
        return number


class _OptionalBool(click.ParamType):
    """A boolean where "" means "not given" (the size preset decides), as MLproject passes it."""

    name = "boolean"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("", "none"):
            return None
        return click.BOOL.convert(text, param, ctx)


class _OptionalChoice(click.Choice):
    """A choice where "" means "not given" (the model's own run or the default decides)."""

    def convert(self, value, param, ctx):
        if value is None or str(value).strip() in ("", "None"):
            return None
        return super().convert(value, param, ctx)


INT, FLOAT, BOOL = _Optional(int), _Optional(float), _OptionalBool()


def bool_option(*decls: str, default: bool | None = None, **kwargs: Any) -> Callable[[Any], Any]:
    """A boolean option that takes a bare flag (`--attention` means true) or a value (`--attention
    false`; "" means not given, as MLproject passes an empty parameter).

    A bare flag followed by another option (`--attention --epochs 3`) is still the flag: click
    leaves a next word starting with "-" alone. Used for options a run can take from MLproject, not
    for switches before a subcommand or an argument (`--debug`, `experiment run --dry-run SPEC`),
    where the next word is not a value.
    """
    return click.option(*decls, type=BOOL, is_flag=False, flag_value=True, default=default,
                        metavar="[true|false]", **kwargs)


def text_or_none(value: str | None) -> str | None:
    return value if value not in (None, "", "None") else None


def _experiment(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """--experiment: empty means the experiment `mlflow run` filed the run under (else kdhar);
    under `mlflow run` one line says which it is."""
    from kdhar import tracking

    name, note = tracking.resolve_experiment(text_or_none(value))
    if note and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        click.echo(note, err=True)
    return name


# Every option a run can take, by name; `run_options` gives a command all of them or a subset.
RUN_OPTIONS = {
    "dataset": click.option("--dataset", default="ucf101", show_default=True, help="ucf101 | hmdb51 | folder"),
    "root": click.option("--root", default=DEFAULT_ROOT, show_default=True, help="dataset root; the default is generated on first use"),
    "split": click.option("--split", default=1, show_default=True, type=INT),
    "split_dir": click.option("--split-dir", default=None, help="folder of the split files when they are not in --root (UCF101: also found beside it)"),
    "fraction": click.option("--fraction", default=1.0, show_default=True, type=FLOAT, help="class-balanced share of training videos, in (0, 1]"),
    "val_fraction": click.option("--val-fraction", type=FLOAT, default=None,
                                 help="share of the training groups held out for validation (default 0.1; 0 with --ssl pcl, "
                                      "as PCL's code, where the self-supervised validation loss selects)"),
    "size": click.option("--size", default="cpu", show_default=True, type=click.Choice(["cpu", "paper"]), help="cpu: small clips/widths/epochs; paper: Table 1"),
    "epochs": click.option("--epochs", type=INT, default=None, help="overrides the size preset"),
    "lr": click.option("--lr", type=FLOAT, default=None),
    "batch_size": click.option("--batch-size", type=INT, default=None),
    "width": click.option("--width", type=INT, default=None, help="base channel count (64 = published size)"),
    "modality": click.option("--modality", type=_OptionalChoice(["rgb", "res"]), default=None,
                             help="rgb, or res: residual frames x[t-1]-x[t] (PCL's input), computed inside the model "
                                  "(default rgb; a logged model's own when scoring or fine-tuning it)"),
    "keep_time": click.option("--keep-time", type=INT, default=None,
                              help="leave out the trunk's last N temporal downsamplings, so its last feature keeps a "
                                   "time axis (default 0; 2 at size cpu with --kd gkd: T' = 4 from 8 frames)"),
    "clip_len": click.option("--clip-len", type=INT, default=None),
    "frame_interval": click.option("--frame-interval", type=INT, default=None),
    "crop": click.option("--crop", type=INT, default=None),
    "test_clips": click.option("--test-clips", type=INT, default=None, help="K clips per test video"),
    "normalize": click.option("--normalize", type=_OptionalChoice(C.NORMALIZE), default=None,
                              help="half: (x-0.5)/0.5; imagenet: ImageNet's mean/std, as PCL's code (default half; "
                                   "imagenet with --ssl pcl; a teacher must see the clips its student does)"),
    "augment": bool_option("--augment", help="the paper's training augmentations (default: on, off at size cpu)"),
    "schedule": click.option("--schedule", type=_OptionalChoice(["cosine", "step", "constant", "plateau"]), default=None,
                             help="lr schedule (default cosine; plateau for --ssl pcl at size paper): plateau is x0.1 "
                                  "after 50 epochs without a lower validation loss (PCL's self-supervised one), as "
                                  "PCL's Table 1"),
    "warmup": click.option("--warmup", type=FLOAT, default=None, help="epochs of linear lr warm-up (default 1; 0 = none, as the paper)"),
    "grad_clip": click.option("--grad-clip", type=FLOAT, default=None, help="clip each step's gradient L2 norm to this (default 0 = off)"),
    "views": click.option("--views", type=INT, default=None, help="replay N fixed augmented views per video (default 0 = a new view every epoch)"),
    "sync_bn": bool_option("--sync-bn", help="with --nproc > 1 on CUDA: BatchNorm over the whole global batch (SyncBatchNorm)"),
    "threads": click.option("--threads", type=INT, default=None, help="torch CPU threads (default 2); results repeat exactly only at the same count"),
    "seed": click.option("--seed", type=INT, default=0, show_default=True),
    "num_workers": click.option("--num-workers", type=INT, default=2, show_default=True),
    "on_missing": click.option("--on-missing", type=click.Choice(["error", "skip"]), default="error", show_default=True),
    "on_bad": click.option("--on-bad", type=click.Choice(["error", "skip"]), default="error", show_default=True),
    "experiment": click.option("--experiment", default=None, callback=_experiment,
                               help="MLflow experiment (default: where `mlflow run` filed the run, else kdhar)"),
    "device": click.option("--device", default="auto", show_default=True),
    "resume": click.option("--resume", default=None, help="checkpoint (runs/checkpoints/<run_id>/last.pt) to continue; the same MLflow run is reopened"),
    "allow_config_change": bool_option("--allow-config-change", default=False, show_default=True,
                                       help="with --resume: accept other --epochs/--threads than the checkpoint's"),
    "stage_models": bool_option("--stage-models",
                                help="also log the model at the early and mid stages (25/75 % of the epochs) as "
                                     "runs:/<run>/model-early and model-mid (default: on for PCL runs, off otherwise)"),
}
# What scoring a model needs: where the data is and how to cut test clips, nothing about training.
EVAL_OPTIONS = ("dataset", "root", "split", "split_dir", "size", "modality", "clip_len", "frame_interval", "crop", "test_clips",
                "batch_size", "threads", "num_workers", "on_missing", "on_bad", "experiment", "device")


def launch_options(fn):
    """Data-parallel training (train-teacher, distill, pretrain, finetune): --nproc N runs the same
    command under torchrun with N processes on this machine; --max-restarts restarts them all from
    the last checkpoint when one dies. A multi-node job runs `torchrun ... -m kdhar <command>` itself."""
    opts = [
        click.option("--nproc", type=INT, default=1, show_default=True,
                     help="processes (one per GPU, or CPU processes with gloo) sharing each global batch, via torchrun"),
        click.option("--max-restarts", type=INT, default=0, show_default=True,
                     help="with --nproc > 1: restarts of the whole job after a process dies, each resuming the last checkpoint"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def run_options(fn=None, *, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()):
    """Adds the run options (MLproject parameters of the same names) to a command: all, `only` these,
    or all but `exclude`. Usable as @run_options or @run_options(only=...)."""

    def add(f):
        names = [n for n in (only or RUN_OPTIONS) if n not in exclude]
        for name in reversed(names):
            f = RUN_OPTIONS[name](f)
        return f

    return add(fn) if fn is not None else add


# Named weightings: SSKD (the source of the KD paper's tau 4) weighs CE 0.1 and KD 0.9.
KD_PRESETS = {"sskd": {"weighting": "mix", "alpha": 0.9}}


def kd_settings(tau, weighting, alpha, lam, ssl: str = "none") -> dict[str, Any]:
    """The KD knobs as given, with a named preset (--kd-weighting sskd) spelled out; without a
    weighting, PCL runs (`ssl` "pcl") take the paper's Eq. 7 (sum) and the others mix."""
    weighting = weighting or C.default_kd_weighting(ssl)
    preset = KD_PRESETS.get(weighting)
    if preset is None:
        return dict(tau=tau, weighting=weighting, alpha=alpha, lam=lam)
    if alpha is not None and alpha != preset["alpha"]:
        raise UserError(f"--kd-weighting {weighting} means alpha {preset['alpha']}; leave --alpha {alpha} out, "
                        "or use --kd-weighting mix with it")
    return dict(tau=tau, weighting=preset["weighting"], alpha=preset["alpha"], lam=lam)


def kd_options(fn):
    """The logit-KD knobs (distill, tune)."""
    opts = [
        click.option("--tau", type=FLOAT, default=None, help="temperature (default 4, the paper's)"),
        click.option("--kd-weighting", type=_OptionalChoice([*C.KD_WEIGHTINGS, *KD_PRESETS]), default=None,
                     help=f"mix: (1-alpha)*CE + alpha*tau^2*KL; sum: CE + lam*tau^2*KL (the paper's Eq. 7); "
                          f"balanced: mix with the soft term's gradient scaled to CE's; sskd: SSKD's weights, mix "
                          f"with alpha 0.9 (CE 0.1, KD 0.9) (default {C.KDConfig.weighting}; "
                          f"{C.PCL_KD_WEIGHTING} with --ssl pcl)"),
        click.option("--alpha", type=FLOAT, default=None, help="soft-term share under mix and balanced (default 0.5)"),
        click.option("--lam", type=FLOAT, default=None, help="soft-term weight under sum (default 1)"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn



def pcl_options(fn=None, *, ssl: bool = True):
    """PCL's knobs (pretrain; distill with --ssl pcl); spec keys of the same names. `ssl`: add --ssl."""
    p = C.PCLConfig
    opts = [
        click.option("--pcl-interval", type=INT, default=None,
                     help=f"frames between a tuple's clips (default {p.interval}, Table 1; 2 at size cpu)"),
        click.option("--clip-stride", type=_OptionalChoice(C.STRIDES), default=None,
                     help="upstream: clips tuple_len+interval apart, as PCL's code (default); nominal: clip_len+interval"),
        click.option("--spatial-perm", type=_OptionalChoice(C.SPATIAL_PERMS), default=None,
                     help="pretext quadrant order: fixed [[D,C],[B,A]] (code, default) or random (paper's prose)"),
        click.option("--swap-pairs", type=_OptionalChoice(C.SWAP_PAIRS), default=None,
                     help="pretext chunk swap: any two of four chunks (code, default) or adjacent ones (prose)"),
        click.option("--contrast", type=_OptionalChoice(C.CONTRASTS), default=None,
                     help="nce: two memory banks with K negatives (code, default); ntxent: in-batch negatives"),
        click.option("--contrast-weight", type=FLOAT, default=None, help=f"weight of the contrastive loss (default {p.contrast_weight:g})"),
        click.option("--negatives", type=INT, default=None, help=f"K negatives per sample from the memory bank (default {p.negatives})"),
        click.option("--nce-temperature", type=FLOAT, default=None, help=f"contrastive temperature (default {p.temperature:g})"),
        click.option("--bank-momentum", type=FLOAT, default=None, help=f"memory-bank update momentum (default {p.momentum:g})"),
    ]
    if ssl:
        opts.insert(0, click.option("--ssl", type=click.Choice(C.SSL_METHODS), default="none", show_default=True,
                                    help="pcl: train inside PCL (pretext + contrastive terms on clip tuples), KD on its action head"))

    def add(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return add(fn) if fn is not None else add


def gkd_options(fn=None, *, kd: bool = True):
    """GKD's knobs (distill, tune; train-teacher without --kd); spec keys of the same names."""
    g = C.GKDConfig
    opts = [
        click.option("--gkd-variant", type=_OptionalChoice(C.GKD_VARIANTS), default=None,
                     help="faithful: the paper's attention and CVAE layers scaled to the feature (default); light: "
                          "pooled space and 1x1 convolutions, for wide trunks and CPUs (a deviation)"),
        click.option("--gkd-ramp", type=FLOAT, default=None,
                     help=f"share of the epochs over which the regeneration weight ramps up (default {g.ramp:g}: the "
                          "paper's 20 of 200; teachers 1, the whole run)"),
        click.option("--gkd-rec-weight", type=FLOAT, default=None, help=f"regeneration loss weight once ramped (default {g.rec_weight:g})"),
        click.option("--cvae-lr", type=FLOAT, default=None,
                     help=f"the CVAE's Adam lr (default {g.cvae_lr:g}, the paper's; 1e-3 at size cpu and for teachers)"),
        click.option("--gkd-ce", type=_OptionalChoice(C.GKD_CE), default=None,
                     help="mean: CE on time-averaged logits (default); sum-softmax: the code's CE on summed softmax"),
        click.option("--gkd-rescale", type=_OptionalChoice(C.GKD_RESCALES), default=None,
                     help="sample: the attended feature keeps each sample's activation mass (default); batch: the code's "
                          "batch-global rescale"),
    ]
    if kd:
        opts = [
            click.option("--kd", type=click.Choice(C.KD_METHODS), default="logit", show_default=True,
                         help="logit: Hinton KD on the logits; feature: FitNets-style hint loss on the last feature; "
                              "gkd: generative feature KD (attention + CVAE, needs a teacher from train-teacher "
                              "--attention; with --teacher none the scratch + attention baseline); gkd+logit: both"),
            click.option("--gkd-beta", type=FLOAT, default=None, help=f"attention-distillation weight (default {g.beta:g})"),
            click.option("--gkd-gd-weight", type=FLOAT, default=None,
                         help=f"generative-distillation weight in the CVAE pass (default {g.gd_weight:g})"),
            click.option("--gkd-ablation", type=_OptionalChoice(C.GKD_ABLATIONS), default=None,
                         help="turn one GKD term off: ad-only (no generative distillation), gd-only (no attention "
                              "distillation), no-rec (no regeneration loss); default none"),
            *opts,
        ]

    def add(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return add(fn) if fn is not None else add


def build_config(arch: str, opts: dict[str, Any], kd: dict[str, Any] | None = None,
                 task: str = "recognition") -> C.RunConfig:
    """Defaults -> size preset -> explicit options; checks what can be checked before any work.
    `task` "detection" adds the detection preset of the size (`kdhar detect` commands)."""
    from kdhar import tracking
    from kdhar.models import MODELS

    if arch not in MODELS:
        raise UserError(f"unknown architecture '{arch}'; choose one of: {', '.join(MODELS)}")
    tracking.check_server(tracking.tracking_uri())
    opts = {"fraction": 1.0, "seed": 0, **opts}  # scoring commands take neither
    if not 0 < opts["fraction"] <= 1:
        raise UserError(f"--fraction {opts['fraction']} is outside (0, 1]; use e.g. 0.25 for 25 % of the training videos")
    from kdhar.experiments import OVERRIDES, DatasetSpec, build_run_config

    from kdhar.objectives.kd import check_kd

    kd_cfg = C.with_overrides(C.KDConfig(), **{k: v for k, v in (kd or {}).items()})
    try:
        check_kd(kd_cfg.tau, kd_cfg.weighting, kd_cfg.alpha, kd_cfg.lam)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # The same defaults -> size preset -> overrides path as experiment grids, so a grid cell and
    # the equivalent command line build identical configurations.
    overrides = {k: opts[k] for k in OVERRIDES if opts.get(k) is not None}
    dataset = DatasetSpec(name=opts["dataset"], root=opts["root"], split=opts["split"], split_dir=text_or_none(opts.get("split_dir")) or "")
    cfg = build_run_config(
        arch, size=opts["size"], overrides=overrides, dataset=dataset, fraction=opts["fraction"],
        seed=opts["seed"], kd=kd_cfg, task=task,
    )
    data = dataclasses.replace(cfg.data, on_missing=opts["on_missing"], on_bad=opts.get("on_bad", "error"))
    return dataclasses.replace(cfg, data=data)


def explicit_clip(opts: dict[str, Any]) -> frozenset[str]:
    """The clip settings and modality given on the command line; the others come from a logged model's own run."""
    return frozenset(k for k in ("clip_len", "frame_interval", "crop", "modality") if opts.get(k) is not None)


def check_crop_fits(cfg: C.RunConfig, opts: dict[str, Any]) -> None:
    """At --size cpu an explicit --crop also sets the resize (the preset keeps the crop's 8/7), so the
    crop is checked against the videos' own frames instead; call it once the data is there."""
    if opts.get("size") != "cpu" or opts.get("crop") is None:
        return
    from kdhar.data import check_crop_in_frames

    d = cfg.data
    try:
        check_crop_in_frames(cfg.clip.crop, d.dataset, d.root, d.split, d.split_dir or None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
