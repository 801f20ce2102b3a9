"""`kdhar detect train-teacher|distill|evaluate`: temporal action detection on untrimmed videos
(THUMOS14 or the synthetic untrimmed set), through the same run machinery as recognition.

A group of its own rather than a `--task` switch on the recognition commands: a detector takes
windows, a head and a decoder (window length and strides, head width, NMS, GKD's background
weight) that no recognition run has, and recognition's clip options (clip length, test clips,
views, the logit cache, PCL) mean nothing to a detector, so each group's `-h` lists only what acts.
"""

from __future__ import annotations

import click

from kdhar import config as C
from kdhar.cli.data import ensure_data
from kdhar.cli.errors import UserError
from kdhar.cli.options import DEFAULT_TAD_ROOT, FLOAT, INT, _OptionalChoice, bool_option, build_config, run_options, text_or_none

# The run options that act on a detection run (clip length, test clips, views, on_bad and split do not).
DETECT_RUN_OPTIONS = ("split_dir", "fraction", "size", "epochs", "lr", "batch_size", "width", "modality",
                      "frame_interval", "crop", "augment", "schedule", "warmup", "grad_clip", "threads", "seed",
                      "num_workers", "on_missing", "experiment", "device", "resume", "allow_config_change")
EVAL_OPTIONS = ("split_dir", "size", "batch_size", "threads", "num_workers", "on_missing", "experiment", "device")
DECODE_OPTIONS = ("test_stride", "nms", "nms_sigma", "nms_iou", "score_threshold", "top_k")


def _data_options(fn):
    """Where the untrimmed videos are: THUMOS14's layout, the synthetic set by default."""
    opts = [
        click.option("--dataset", type=click.Choice(["thumos14"]), default="thumos14", show_default=True,
                     help="thumos14: <root>/validation, <root>/test and THUMOS14's annotation files"),
        click.option("--root", default=DEFAULT_TAD_ROOT, show_default=True,
                     help="dataset root; the default (synthetic untrimmed videos) is generated on first use"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _decode_options(fn):
    """How test windows are cut and their outputs decoded into segments (acts when scoring)."""
    d = C.DetectionConfig
    opts = [
        click.option("--test-stride", type=INT, default=None, help="frames between test windows (default 128, as AFSD)"),
        click.option("--nms", type=_OptionalChoice(C.DET_NMS), default=None,
                     help="soft: Gaussian soft-NMS (default, GKD's and AFSD's); hard: NMS"),
        click.option("--nms-sigma", type=FLOAT, default=None, help=f"soft-NMS's Gaussian width (default {d.sigma:g})"),
        click.option("--nms-iou", type=FLOAT, default=None, help=f"hard NMS's tIoU threshold (default {d.iou_threshold:g})"),
        click.option("--score-threshold", type=FLOAT, default=None,
                     help=f"(step, class) scores below it propose nothing (default {d.score_threshold:g})"),
        click.option("--top-k", type=INT, default=None, help=f"detections kept per video (default {d.top_k})"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _detector_options(fn):
    """The windows a detector trains on and its head (train-teacher, distill)."""
    d, w = C.DetectionConfig, C.WindowConfig
    opts = [
        click.option("--window-length", type=INT, default=None,
                     help=f"steps per window (default 128 at size cpu, {w.length} at size paper, as GKD's code)"),
        click.option("--train-stride", type=INT, default=None,
                     help="frames between training windows (default 64 at size cpu, 30 at size paper)"),
        click.option("--min-inside", type=FLOAT, default=None,
                     help=f"a training window keeps a segment with this share of it inside (default {w.min_inside:g})"),
        click.option("--head-channels", type=INT, default=None, help="width of the 1-D head (default 32 at size cpu, 64 at paper)"),
        click.option("--reg-weight", type=FLOAT, default=None, help=f"weight of the 1-D GIoU loss (default {d.reg_weight:g})"),
        click.option("--det-optimizer", type=_OptionalChoice(C.DET_OPTIMIZERS), default=None,
                     help="adam (default, GKD's detection code) or sgd; every method of a comparison should share it"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return _decode_options(fn)


def _gkd_options(fn=None, *, kd: bool = True):
    """GKD's detection knobs; with `kd` the distillation's too (distill)."""
    g = C.GKDConfig
    opts = [
        click.option("--gkd-variant", type=_OptionalChoice(C.GKD_VARIANTS), default=None,
                     help="faithful: the paper's attention and CVAE layers scaled to each tap (default); light: pooled space"),
        click.option("--gkd-ramp", type=FLOAT, default=None,
                     help=f"share of the epochs over which the regeneration weight ramps (default {g.ramp:g}; teachers 1)"),
        click.option("--gkd-rec-weight", type=FLOAT, default=None, help=f"regeneration loss weight (default {g.rec_weight:g})"),
        click.option("--cvae-lr", type=FLOAT, default=None, help="the CVAEs' Adam lr (default 1e-3 at size cpu, 1e-4 at paper)"),
        click.option("--bg-weight", type=FLOAT, default=None,
                     help=f"weight of GKD's background branch, the gaps between segments as background (default "
                          f"{C.DetectionConfig.bg_weight:g}, the detection code's)"),
    ]
    if kd:
        opts = [
            click.option("--kd", type=click.Choice(["logit", "gkd"]), default="logit", show_default=True,
                         help="logit: KL of the per-step class scores to the teacher's; gkd: GKD (attention, CVAE, "
                              "background branch; needs a teacher from detect train-teacher --attention; with "
                              "--teacher none the scratch + attention baseline)"),
            click.option("--tau", type=FLOAT, default=None, help=f"score distillation's temperature (default {C.KDConfig.tau:g})"),
            click.option("--lam", type=FLOAT, default=None, help=f"score distillation's weight (default {C.KDConfig.lam:g})"),
            click.option("--gkd-beta", type=FLOAT, default=None,
                         help="attention distillation's weight, summed over both taps (default 10, the detection code's)"),
            click.option("--gkd-gd-weight", type=FLOAT, default=None,
                         help=f"generative distillation's weight in the CVAE pass (default {g.gd_weight:g})"),
            *opts,
        ]

    def add(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return add(fn) if fn is not None else add


def _config(arch: str, opts: dict, kd: dict | None = None) -> C.RunConfig:
    cfg = build_config(arch, {"split": 1, "on_bad": "error", **opts}, kd=kd, task="detection")
    ensure_data(cfg.data.root)
    return cfg


@click.group("detect")
def detect() -> None:
    """Temporal action detection: train a detector, distil one, score one (THUMOS14 layout)."""


@detect.command("train-teacher")
@click.option("--arch", default="c3d", show_default=True, help="the trunk (a registry backbone tapped twice)")
@bool_option("--attention", default=False, show_default=True,
             help="with GKD's attention module and a CVAE on each tap (GKD's teacher phase), for distill --kd gkd")
@click.option("--init", default=None, help="a detection run's model URI or checkpoint to start from")
@_gkd_options(kd=False)
@_detector_options
@_data_options
@run_options(only=DETECT_RUN_OPTIONS)
def train_teacher(arch: str, attention: bool, init, **opts) -> None:
    """Train a detector from the segments; registered as kdhar-det-teacher-<arch> (with --attention:
    kdhar-det-teacher-attention-<arch>)."""
    from kdhar.distill import load_init
    from kdhar.train import run_training

    if attention:  # GKD's phase 1: the regeneration weight ramps over the whole run, the CVAEs' Adam at 1e-3
        opts = {**opts, "attention": True, "gkd_ramp": opts["gkd_ramp"] or 1.0, "cvae_lr": opts["cvae_lr"] or 1e-3}
    elif any(opts.get(k) is not None for k in ("gkd_variant", "gkd_ramp", "gkd_rec_weight", "cvae_lr", "bg_weight")):
        raise UserError("the --gkd-*/--cvae-lr/--bg-weight options shape GKD's attention module: add --attention true")
    cfg = _config(arch, opts)
    init = text_or_none(init)
    res = run_training(cfg, role="teacher", experiment=opts["experiment"], resume=text_or_none(opts["resume"]),
                       init_state=load_init(init) if init else None, init=init,
                       allow_config_change=bool(opts["allow_config_change"]), device=opts["device"])
    _print_result(res)


@detect.command("distill")
@click.option("--teacher", default="c3d", show_default=True,
              help="arch name (its detection champion), models:/ or runs:/ URI of a detection run, or none")
@click.option("--student", default="tiny3d", show_default=True)
@_gkd_options
@_detector_options
@_data_options
@run_options(only=DETECT_RUN_OPTIONS)
def distill(teacher: str, student: str, tau, lam, **opts) -> None:
    """Distil a detection teacher into a student (teacher=none: the paired scratch run; with --kd gkd
    the scratch + attention one)."""
    from kdhar import distill as D

    cfg = _config(student, opts, kd={"tau": tau, "lam": lam})
    res = D.distill(cfg, teacher=teacher, experiment=opts["experiment"], resume=text_or_none(opts["resume"]),
                    allow_config_change=bool(opts["allow_config_change"]), device=opts["device"])
    _print_result(res)


@detect.command("evaluate")
@click.option("--model", "model_uri", required=True, help="models:/ or runs:/ URI of a detector to score")
@_decode_options
@_data_options
@run_options(only=EVAL_OPTIONS)
def evaluate(model_uri: str, **opts) -> None:
    """Score a logged detector on the test videos: mAP at tIoU 0.3-0.7 (THUMOS14) and 0.1-0.5 (GKD),
    per-class AP and timelines, recorded as an evaluation run."""
    from kdhar.evaluation import evaluate_detector

    cfg = _config("c3d", {"fraction": 1.0, "seed": 0, **opts})  # the windows come from the model's own run
    explicit = frozenset(k for k in ("test_stride",) if opts.get(k) is not None)
    metrics = evaluate_detector(model_uri, cfg, experiment=opts["experiment"], device=opts["device"], explicit=explicit)
    shown = {k: v for k, v in metrics.items() if "_map_" in k}
    click.echo(", ".join(f"{k}={v:.4f}" for k, v in shown.items()))


def _print_result(res) -> None:
    shown = {k: v for k, v in res.final.items() if isinstance(v, float) and "_ap_" not in k}
    click.echo(f"run {res.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))
    if res.model_uri:
        click.echo(f"model: {res.model_uri}")


COMMANDS = (detect,)
