"""The `kdhar` command. Each command maps MLproject parameters 1:1 to options; logic lives elsewhere."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kdhar import config as C

DEFAULT_ROOT = "data/synthetic/ucf101"
DEFAULT_HMDB_ROOT = "data/synthetic/hmdb51"


class UserError(click.ClickException):
    """A mistake in the user's input: printed as one line, exit code 2."""

    exit_code = 2


def _is_user_error(exc: BaseException) -> bool:
    from kdhar.checkpoint import CheckpointError
    from kdhar.data.index import MissingVideosError
    from kdhar.data.video import VideoError
    from kdhar.tracking import TrackingError, is_bad_reference

    if is_bad_reference(exc):
        return True
    return isinstance(exc, (ValueError, FileNotFoundError, MissingVideosError, VideoError, TrackingError, CheckpointError))


def main() -> None:
    """Console entry point: user mistakes become one-line errors (--debug or KDHAR_DEBUG=1 shows tracebacks)."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("KDHAR_DEBUG") or not _is_user_error(exc):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        click.echo(f"Error: {message}", err=True)  # the same form as click's own usage errors
        sys.exit(2)


# Third-party chatter that buries kdhar's own lines: MLflow's artifact-download bars and INFO logs,
# Optuna's line per trial. --verbose keeps them.
QUIET_LOGGERS = ("mlflow", "optuna", "alembic", "urllib3")


def _quiet_third_parties() -> None:
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow resets its loggers when imported
    os.environ.setdefault("KDHAR_QUIET_OPTUNA", "1")  # so does Optuna: kdhar.tuning applies this
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdhar", prog_name="kdhar")
@click.option("--debug", is_flag=True, help="show tracebacks for user errors too")
@click.option("--verbose", is_flag=True, help="keep MLflow's and Optuna's own logs and progress bars")
def cli(debug: bool, verbose: bool) -> None:
    """Knowledge distillation for video action recognition.

    Shell completion (bash): eval "$(_KDHAR_COMPLETE=bash_source kdhar)"; zsh: zsh_source; fish: fish_source.
    """
    if debug:
        os.environ["KDHAR_DEBUG"] = "1"
    if not verbose:
        _quiet_third_parties()


# ---------------------------------------------------------------- shared options
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


def _text(value: str | None) -> str | None:
    return value if value not in (None, "", "None") else None


def _experiment(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """--experiment: empty means the experiment `mlflow run` filed the run under (else kdhar);
    under `mlflow run` one line says which it is."""
    from kdhar import tracking

    name, note = tracking.resolve_experiment(_text(value))
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
    "size": click.option("--size", default="cpu", show_default=True, type=click.Choice(["cpu", "paper"]), help="cpu: small clips/widths/epochs; paper: Table 1"),
    "epochs": click.option("--epochs", type=INT, default=None, help="overrides the size preset"),
    "lr": click.option("--lr", type=FLOAT, default=None),
    "batch_size": click.option("--batch-size", type=INT, default=None),
    "width": click.option("--width", type=INT, default=None, help="base channel count (64 = published size)"),
    "modality": click.option("--modality", type=_OptionalChoice(["rgb", "res"]), default=None,
                             help="rgb, or res: residual frames x[t-1]-x[t] (PCL's input), computed inside the model "
                                  "(default rgb; a logged model's own when scoring or fine-tuning it)"),
    "clip_len": click.option("--clip-len", type=INT, default=None),
    "frame_interval": click.option("--frame-interval", type=INT, default=None),
    "crop": click.option("--crop", type=INT, default=None),
    "test_clips": click.option("--test-clips", type=INT, default=None, help="K clips per test video"),
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


def _launch(opts: dict[str, Any], batch_size: int) -> None:
    """Re-runs this command under torchrun when --nproc > 1 and this process is not one of its ranks
    already. Called once the command's settings are checked and its data is there, so a mistake is
    one line from this process rather than from every rank, and the ranks do not race to write the
    synthetic data. torchrun replaces this process: a signal sent to it (Ctrl-C, SIGTERM from a
    scheduler) reaches torchrun, which stops the ranks, and its exit status is the command's."""
    nproc, restarts = opts.pop("nproc", None), opts.pop("max_restarts", None)
    # An empty value (an entry point's default) means the default; 0 is a value, and refused.
    nproc, restarts = 1 if nproc is None else nproc, 0 if restarts is None else restarts
    if nproc < 1 or restarts < 0:
        raise UserError(f"--nproc {nproc} / --max-restarts {restarts}: give --nproc >= 1 and --max-restarts >= 0")
    if nproc == 1 or "LOCAL_RANK" in os.environ:
        return
    from kdhar import distributed

    try:
        distributed.Distributed(rank=0, world=nproc, local_rank=0).per_rank_batch(batch_size)
    except ValueError as exc:
        raise UserError(str(exc)) from None

    args, rest = [], iter(sys.argv[1:])
    for arg in rest:  # the ranks run the command without the launcher's own options
        if arg in ("--nproc", "--max-restarts"):
            next(rest, None)
        elif not arg.startswith(("--nproc=", "--max-restarts=")):
            args.append(arg)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", str(restarts), "-m", "kdhar", *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, distributed.launcher_env(dict(os.environ)))


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


def kd_settings(tau, weighting, alpha, lam) -> dict[str, Any]:
    """The KD knobs as given, with a named preset (--kd-weighting sskd) spelled out."""
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
        click.option("--kd-weighting", type=click.Choice([*C.KD_WEIGHTINGS, *KD_PRESETS]), default=C.KDConfig.weighting,
                     show_default=True, help="mix: (1-alpha)*CE + alpha*tau^2*KL; sum: CE + lam*tau^2*KL (the paper's "
                                             "Eq. 7); sskd: SSKD's weights, mix with alpha 0.9 (CE 0.1, KD 0.9)"),
        click.option("--alpha", type=FLOAT, default=None, help="soft-term share under mix (default 0.5)"),
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
                         help="logit: Hinton KD on the logits; gkd: generative feature KD (attention + CVAE, needs a "
                              "teacher from train-teacher --attention; with --teacher none the scratch + attention "
                              "baseline); gkd+logit: both"),
            click.option("--gkd-beta", type=FLOAT, default=None, help=f"attention-distillation weight (default {g.beta:g})"),
            click.option("--gkd-gd-weight", type=FLOAT, default=None,
                         help=f"generative-distillation weight in the CVAE pass (default {g.gd_weight:g})"),
            *opts,
        ]

    def add(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return add(fn) if fn is not None else add


def build_config(arch: str, opts: dict[str, Any], kd: dict[str, Any] | None = None) -> C.RunConfig:
    """Defaults -> size preset -> explicit options; checks what can be checked before any work."""
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
    dataset = DatasetSpec(name=opts["dataset"], root=opts["root"], split=opts["split"], split_dir=_text(opts.get("split_dir")) or "")
    cfg = build_run_config(
        arch, size=opts["size"], overrides=overrides, dataset=dataset, fraction=opts["fraction"],
        seed=opts["seed"], kd=kd_cfg,
    )
    data = dataclasses.replace(cfg.data, on_missing=opts["on_missing"], on_bad=opts["on_bad"])
    return dataclasses.replace(cfg, data=data)


def ensure_data(root: str) -> None:
    """Generates the embedded synthetic datasets on first use of the default root."""
    if Path(root).exists() or root not in (DEFAULT_ROOT, DEFAULT_HMDB_ROOT):
        if not Path(root).exists():
            raise UserError(f"dataset root {root} does not exist; check --root (or omit it to use the synthetic default)")
        return
    click.echo(f"{root} not found: generating the synthetic datasets (once)", err=True)
    _synth(Path(DEFAULT_ROOT).parent, layout="both", spec_kw={})


def _synth(out: Path, layout: str, spec_kw: dict[str, Any], workers: int = 2, overwrite: bool = False) -> None:
    from kdhar.data import synthetic

    spec = synthetic.SynthSpec(**{k: v for k, v in spec_kw.items() if v is not None})
    layouts = ["ucf101", "hmdb51"] if layout == "both" else [layout]
    for name in layouts:
        with _bar(f"synth {name}") as bar:
            ds = synthetic.generate(out / name, layout=name, spec=spec, workers=workers, on_progress=bar, overwrite=overwrite)
        click.echo(f"wrote {ds.num_videos} videos, {len(ds.classes)} classes -> {ds.root}")


class _bar:
    """A click progress bar usable as an on_progress(done, total) callback."""

    def __init__(self, label: str):
        self.label, self.bar, self.done = label, None, 0

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ---------------------------------------------------------------- data
@cli.group()
def data() -> None:
    """Generate and check datasets."""


@data.command("synth")
@click.option("--out", default="data/synthetic", show_default=True, type=click.Path(path_type=Path))
@click.option("--layout", default="both", show_default=True, type=click.Choice(["ucf101", "hmdb51", "both"]))
@click.option("--classes", "num_classes", type=INT, default=None)
@click.option("--groups", type=INT, default=None)
@click.option("--clips-per-group", type=INT, default=None)
@click.option("--frames", type=INT, default=None)
@click.option("--difficulty", type=FLOAT, default=None, help="0 (easy) .. 1 (hard)")
@click.option("--seed", type=INT, default=None)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing set made with other settings")
def data_synth(out, layout, num_classes, groups, clips_per_group, frames, difficulty, seed, workers, overwrite) -> None:
    """Write synthetic action videos (real encoded AVIs) with UCF101/HMDB51 split files."""
    spec = dict(num_classes=num_classes, groups=groups, clips_per_group=clips_per_group, frames=frames, difficulty=difficulty, seed=seed)
    _synth(out, layout, spec, workers, overwrite)


@data.command("check")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--dataset", default="ucf101", show_default=True)
@click.option("--split", default=1, show_default=True, type=INT)
@click.option("--split-dir", default=None, help="folder of the split files when they are not in ROOT")
@click.option("--workers", default=2, show_default=True, type=int)
def data_check(root, dataset, split, split_dir, workers) -> None:
    """Decode every listed video and report counts per class and every bad file."""
    from kdhar.data.check import LAYOUTS, check_dataset, format_report
    from kdhar.data.index import SplitFileError

    if not root.exists():
        raise UserError(f"dataset root {root} does not exist")
    try:
        with _bar("decoding") as bar:
            report = check_dataset(root, dataset, split, workers, split_dir=_text(split_dir), on_progress=bar)
    except SplitFileError as exc:
        click.echo(f"Error: {exc}", err=True)
        click.echo("kdhar reads these layouts:\n" + "\n".join(f"  {text}" for text in LAYOUTS.values()), err=True)
        sys.exit(2)
    click.echo(format_report(report))
    if report.bad:
        sys.exit(1)


# ---------------------------------------------------------------- models
@cli.command("models")
@click.option("--width", default=8, show_default=True)
@click.option("--clip-len", default=8, show_default=True)
@click.option("--crop", default=56, show_default=True)
@click.option("--num-classes", default=101, show_default=True)
def models_cmd(width, clip_len, crop, num_classes) -> None:
    """Parameters and forward FLOPs per clip of every registered model."""
    from kdhar.models import MODELS, describe

    click.echo(f"input 3x{clip_len}x{crop}x{crop}, width {width}, {num_classes} classes")
    click.echo(f"{'model':<14}{'params':>12}{'GFLOPs/clip':>14}")
    for name in MODELS:
        d = describe(name, num_classes, width, clip_len, crop)
        click.echo(f"{name:<14}{d['params']:>12,}{d['flops'] / 1e9:>14.3f}")


# ---------------------------------------------------------------- training
@cli.command("train-teacher")
@click.option("--arch", default="c3d", show_default=True)
@bool_option("--attention", default=False, show_default=True,
             help="with GKD's attention module and CVAE, trained in two passes per epoch (GKD's phase 1), for "
                  "distill --kd gkd; add --init runs:/<teacher> to continue from a trained teacher")
@click.option("--init", default=None, help="checkpoint or model URI to start from (e.g. a teacher without attention)")
@gkd_options(kd=False)
@launch_options
@run_options
def train_teacher(arch: str, attention: bool, init, **opts) -> None:
    """Train a teacher from labels; registered as kdhar-teacher-<arch> (with --attention:
    kdhar-teacher-attention-<arch>, network and CVAE together)."""
    from kdhar.distill import check_init_modality, load_init
    from kdhar.train import run_training

    gkd_knobs = ("gkd_variant", "gkd_ramp", "gkd_rec_weight", "cvae_lr", "gkd_ce", "gkd_rescale")
    if attention:
        # GKD's phase 1: the regeneration weight ramps over the whole run, the CVAE's Adam at 1e-3.
        opts = {**opts, "attention": True, "gkd_ramp": opts["gkd_ramp"] or 1.0, "cvae_lr": opts["cvae_lr"] or 1e-3}
    elif any(opts.get(k) is not None for k in gkd_knobs):
        raise UserError("the --gkd-*/--cvae-lr options shape GKD's attention module: add --attention true")
    cfg = build_config(arch, opts)
    ensure_data(cfg.data.root)
    if _text(init):
        check_init_modality(_text(init), cfg.model.modality)
    _launch(opts, cfg.optim.batch_size)
    res = run_training(cfg, role="teacher", experiment=opts["experiment"], resume=_text(opts["resume"]),
                       init_state=load_init(_text(init)) if _text(init) else None, init=_text(init),
                       allow_config_change=bool(opts["allow_config_change"]), device=opts["device"])
    _print_result(res)


@cli.command("distill")
@click.option("--teacher", default="c3d", show_default=True, help="arch name (its champion), models:/ or runs:/ URI, checkpoint path, or none")
@click.option("--student", default="tiny3d", show_default=True)
@kd_options
@click.option("--init", default=None, help="checkpoint or model URI to start the student from")
@bool_option("--cache-teacher", default=False, show_default=True,
             help="reuse teacher logits for replayed views (needs --views, on the scratch twin too)")
@pcl_options
@gkd_options
@launch_options
@run_options
def distill(teacher: str, student: str, tau, kd_weighting, alpha, lam, init, cache_teacher, **opts) -> None:
    """Distil a teacher into a student (teacher=none: the paired scratch run); --ssl pcl trains it inside PCL.

    The SSKD preset (CE weight 0.1, KD weight 0.9) is --kd-weighting sskd; the KD paper's Eq. 7 is
    --kd-weighting sum --lam 1. --kd gkd distils features generatively (GKD, AAAI-24).
    """
    from kdhar import distill as D

    cfg = build_config(student, opts, kd=kd_settings(tau, kd_weighting, alpha, lam))
    ensure_data(cfg.data.root)
    _launch(opts, cfg.optim.batch_size)
    res = D.distill(
        cfg, teacher=teacher, init=_text(init), experiment=opts["experiment"], resume=_text(opts["resume"]),
        allow_config_change=bool(opts["allow_config_change"]),
        device=opts["device"], cache_teacher=bool(cache_teacher),
    )
    _print_result(res)


@cli.command("pretrain")
@click.option("--arch", default="c3d", show_default=True)
@pcl_options(ssl=False)
@launch_options
@run_options
def pretrain_cmd(arch: str, **opts) -> None:
    """Label-free PCL pretraining; the encoder is logged as a model for --init (distill, finetune)."""
    from kdhar.train import run_training
    from kdhar.objectives import build_objective

    cfg = build_config(arch, {**opts, "ssl": "pcl"})
    ensure_data(cfg.data.root)
    _launch(opts, cfg.optim.batch_size)
    res = run_training(cfg, role="pretrain", experiment=opts["experiment"], objective=build_objective(cfg, labels=False),
                       resume=_text(opts["resume"]), allow_config_change=bool(opts["allow_config_change"]),
                       device=opts["device"])
    _print_result(res)


@cli.command("finetune")
@click.option("--model", "model_uri", required=True, help="models:/ or runs:/ URI of the model to transfer")
@launch_options
@run_options
def finetune_cmd(model_uri: str, **opts) -> None:
    """Fine-tune a logged model on another dataset (its classifier is replaced)."""
    from kdhar.finetune import finetune

    cfg = build_config("c3d", opts)  # the architecture and width come from the source model
    ensure_data(cfg.data.root)
    _launch(opts, cfg.optim.batch_size)
    res = finetune(model_uri, cfg, experiment=opts["experiment"], resume=_text(opts["resume"]),
                       allow_config_change=bool(opts["allow_config_change"]), device=opts["device"],
                   explicit=_explicit_clip(opts))
    _print_result(res)


@cli.command("evaluate")
@click.option("--model", "model_uri", required=True, help="models:/ or runs:/ URI of the model to score")
@bool_option("--retrieval", default=False, show_default=True,
             help="also clip retrieval top-1/5/10/20/50 of test videos against training videos (label-free)")
@run_options(only=EVAL_OPTIONS)
def evaluate_cmd(model_uri: str, retrieval: bool, **opts) -> None:
    """Score a logged model on a dataset's test split (clip/video accuracy, optionally retrieval)."""
    from kdhar.evaluation import evaluate_model

    cfg = build_config("c3d", opts)
    ensure_data(cfg.data.root)
    metrics = evaluate_model(model_uri, cfg, experiment=opts["experiment"], device=opts["device"],
                             explicit=_explicit_clip(opts), retrieval=bool(retrieval))
    click.echo(", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


@cli.command("tune")
@click.option("--teacher", default="c3d", show_default=True)
@click.option("--student", default="tiny3d", show_default=True)
@click.option("--n-trials", type=INT, default=20, show_default=True, help="total trials of the study, over all workers")
@click.option("--study-name", default=None, help="default: derived from teacher, student and dataset")
@click.option("--storage", default=None, help="optuna storage URL without a password (default: $KDHAR_OPTUNA_STORAGE, else "
              "sqlite:///optuna.db; postgresql://... for many workers: give one with a password through that variable "
              "or --storage-file)")
@click.option("--storage-file", default=None, help="a file whose first line is the optuna storage URL (may hold a password)")
@kd_options
@click.option("--space", default=None, help='search space, e.g. "tau=1:8:log,alpha=0.1:0.9,lr=none" (none: not searched)')
@click.option("--pruner", type=click.Choice(["median", "asha", "hyperband", "none"]), default="median", show_default=True)
@bool_option("--cache-teacher", default=False, show_default=True,
             help="reuse teacher logits across trials for replayed views (needs --views)")
@click.option("--dashboard", is_flag=True, help="print the optuna-dashboard command for the storage and exit")
@click.option("--heartbeat-interval", type=INT, default=60, show_default=True,
              help="seconds between a trial's heartbeats; a trial silent for the grace period is failed and retried")
@click.option("--grace-period", type=INT, default=None, help="seconds without a heartbeat before a trial counts as dead "
              "(default twice the interval); a restarted single worker waits this long for its own dead trial")
@pcl_options
@gkd_options
@run_options(exclude=("resume", "allow_config_change"))
def tune_cmd(teacher, student, n_trials, study_name, storage, storage_file, tau, kd_weighting, alpha, lam, space, pruner,
             cache_teacher, dashboard, heartbeat_interval, grace_period, **opts) -> None:
    """Tune the KD temperature, weight and lr with Optuna (trials are nested MLflow runs); with --kd gkd
    GKD's beta and ramp (and tau/alpha for gkd+logit)."""
    from kdhar import tuning

    storage = tuning.storage_from_options(_text(storage), _text(storage_file))
    if dashboard:
        click.echo(tuning.dashboard_command(storage))
        return
    kd = kd_settings(tau, kd_weighting, alpha, lam)
    cfg = build_config(student, opts, kd=kd)
    ensure_data(cfg.data.root)
    summary = tuning.tune(
        cfg, teacher=teacher, n_trials=n_trials, study_name=_text(study_name), storage=storage,
        space=tuning.SearchSpace.parse(_text(space), kd["weighting"], cfg.gkd.method), pruner=pruner, experiment=opts["experiment"],
        seed=opts["seed"], cache_teacher=bool(cache_teacher), device=opts["device"], log=lambda line: click.echo(line, err=True),
        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
    )
    best = summary.get("best_params") or {}
    click.echo(
        f"study {summary['study_name']}: {summary['complete']} complete, {summary['pruned']} pruned, "
        f"{summary['failed']} failed; best val acc {summary['best_value']} at "
        + ", ".join(f"{k}={v:.3g}" for k, v in best.items())
    )
    click.echo(f"dashboard: {summary['dashboard']}")


@cli.group()
def bench() -> None:
    """Checks of this machine's speed."""


def _distill_default(name: str) -> str:
    """The default of a `kdhar distill` option, so the GPU check measures the pair a run trains."""
    return next(p.default for p in distill.params if p.name == name)


@bench.command("gpu")
@click.option("--dry-run", is_flag=True, help="the same path at a tiny size on the CPU, a couple of steps per configuration (CI)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="where the results go (default: $OUT/gpu.json when $OUT is set, else benchmarks/results/gpu.json)")
@click.option("--budget-s", type=FLOAT, default=300.0, show_default=True, help="seconds the whole check may take; steps are sized to it")
@click.option("--peak-tflops", type=FLOAT, default=None, help="the device's dense bf16 peak for MFU (default: from a table of common GPUs)")
@click.option("--num-workers", type=INT, default=2, show_default=True, help="loader workers (the training commands' default)")
@click.option("--batch-size", type=INT, default=None, help="default: the paper's 16 (4 in a dry run)")
@click.option("--teacher", default=_distill_default("teacher"), show_default=True, help="architecture of the teacher")
@click.option("--student", default=_distill_default("student"), show_default=True, help="architecture of the student")
@click.option("--root", default=DEFAULT_ROOT, show_default=True,
              help="videos to load (UCF101 layout); the default, when absent, is a small synthetic set made in a temporary folder")
@bool_option("--deterministic", help="deterministic kernels, cuDNN autotuning off (default: on, as runs)")
@click.option("--device", default="auto", show_default=True, help="auto: CUDA when available (the CPU in a dry run)")
def bench_gpu(dry_run, json_path, budget_s, peak_tflops, num_workers, batch_size, teacher, student, root, deterministic,
              device) -> None:
    """Training clips/s, peak memory and MFU of the default teacher and student at the paper's size,
    with bf16 autocast, channels_last_3d and torch.compile on and off, and whether the loader keeps up."""
    from kdhar import gpu_check

    import torch

    if not dry_run and not torch.cuda.is_available():
        click.echo("note: no CUDA device: measuring the paper's size on the CPU (--dry-run is the quick check)", err=True)
    res = gpu_check.run_check(
        dry_run=dry_run, budget_s=budget_s, root=root, default_root=DEFAULT_ROOT, teacher=teacher, student=student,
        batch_size=batch_size, num_workers=num_workers, device=device, deterministic=deterministic,
        peak_tflops_override=peak_tflops, log=lambda line: click.echo(line, err=True),
    )
    click.echo(gpu_check.format_report(res))
    path = gpu_check.write_json(res, json_path or gpu_check.default_json_path())
    click.echo(f"wrote {path}")


@cli.group()
def runs() -> None:
    """Housekeeping of MLflow runs."""


@runs.command("reconcile")
@click.option("--storage", default=None, help="optuna storage URL without a password (default: $KDHAR_OPTUNA_STORAGE, "
              "else sqlite:///optuna.db)")
@click.option("--storage-file", default=None, help="a file whose first line is the optuna storage URL (may hold a password)")
@click.option("--study-name", default=None, help="a tuning study: its trials whose worker died")
@click.option("--experiment", default=None, help="an MLflow experiment: its runs whose process on this machine is gone")
def runs_reconcile(storage, storage_file, study_name, experiment) -> None:
    """End runs left RUNNING by a process that died (a tuning trial's worker, a killed grid cell) as KILLED."""
    if not _text(study_name) and not _text(experiment):
        raise UserError("give --study-name (a tuning study) or --experiment (runs of grids and commands), or both")
    ended = []
    if _text(study_name):
        from kdhar import tuning

        ended += tuning.reconcile(tuning.storage_from_options(_text(storage), _text(storage_file)), study_name)
    if _text(experiment):
        from kdhar import tracking
        from kdhar.experiments import reconcile_runs

        tracking.check_server(tracking.tracking_uri())
        if not tracking.experiment_exists(experiment):
            raise UserError(f"experiment '{experiment}' does not exist at {tracking.mask_uri(tracking.tracking_uri())}; "
                            "check --experiment (`mlflow experiments search` lists them)")
        ended += reconcile_runs(experiment)
    click.echo(f"ended {len(ended)} run(s) as KILLED" + (": " + ", ".join(ended) if ended else ""))


@cli.command("report")
@click.option("--experiment", default=None, help="default: every experiment that holds kdhar student runs")
@click.option("--out", default="reports", show_default=True, type=click.Path(path_type=Path))
@click.option("--margin", default=5.0, show_default=True, type=click.FloatRange(0, 100, min_open=True, max_open=True),
              help="equivalence margin in accuracy points: within ±margin counts as no effect (TOST)")
def report_cmd(experiment, out, margin) -> None:
    """KD-vs-scratch tables, paired tests and plots (paper layout) from an experiment's runs; each
    report is logged as a run of the experiment `<experiment>-reports`."""
    from kdhar import tracking
    from kdhar.report import build_report, report_folder, reported_experiments

    tracking.check_server(tracking.tracking_uri())
    names = [experiment] if _text(experiment) else reported_experiments()
    tracking.release_project_run({"role": "report-launcher"}, name="report",
                                 description=f"Launched `kdhar report` for {', '.join(names)}; each report is a run "
                                             "of the experiment <experiment>-reports.")
    for name in names:
        report = build_report(name, out / report_folder(name), margin=margin / 100)
        click.echo(report.text)
        for path in report.files:
            click.echo(f"wrote {path}")


@cli.group()
def experiment() -> None:
    """Experiment grids from YAML specs."""


@experiment.command("run")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--workers", type=INT, default=1, show_default=True, help="worker processes per phase")
@click.option("--experiment", "experiment_name", default=None, help="overrides the spec's experiment")
@click.option("--device", default="auto", show_default=True)
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine's processes (--workers); ray: each cell a Ray task (pip install kdhar[ray])")
@click.option("--address", default=None, help="with --executor ray: the Ray cluster (auto, host:6379); default: start Ray on this machine")
@click.option("--dry-run", is_flag=True, help="list the cells in run order and which are already done; train nothing")
def experiment_run(spec, workers, experiment_name, device, executor, address, dry_run) -> None:
    """Train every cell of a grid (teachers first), skipping cells already finished."""
    from kdhar.experiments import grid_status, load_spec, run_grid

    address = _text(address)
    if address and executor != "ray":
        raise UserError("--address is the Ray cluster of --executor ray; add --executor ray or leave out --address")
    if executor == "ray" and workers != 1:
        raise UserError("--workers is for --executor local; on Ray as many cells run at once as the cluster's "
                        "CPUs and GPUs allow")
    if not spec.exists():
        raise UserError(f"experiment spec {spec} does not exist (see experiments/*.yaml)")
    if dry_run:
        from kdhar import tracking

        tracking.check_server(tracking.tracking_uri())
        status = grid_status(spec, _text(experiment_name))
        for n, (cell, run_id) in enumerate(status, 1):
            click.echo(f"[{n:>{len(str(len(status)))}}/{len(status)}] {cell.label()}: "
                       + (f"done, run {run_id}" if run_id else "to train"))
        todo = sum(run_id is None for _, run_id in status)
        click.echo(f"{len(status) - todo} done, {todo} to train")
        return
    grid_executor = None
    if executor == "ray":
        try:
            from kdhar.experiments.executors.ray import RayExecutor
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install kdhar[ray]") from None
        grid_executor = RayExecutor(address, log=click.echo)
    for root in _spec_roots(load_spec(spec)):
        ensure_data(root)
    from kdhar import tracking

    tracking.release_project_run({"role": "grid", "spec": str(spec)}, name=f"grid-{spec.stem}",
                                 description=f"Launched the grid {spec}: each cell is a run of its own in the spec's experiment.")
    outcomes = run_grid(spec, workers=workers, experiment=_text(experiment_name), device=device, log=click.echo,
                        executor=grid_executor)
    done = sum(o.status == "done" for o in outcomes)
    click.echo(f"{done} trained, {len(outcomes) - done} already finished")


@cli.command("demo")
@click.option("--spec", default="experiments/demo.yaml", show_default=True, type=click.Path(path_type=Path))
@click.option("--n-trials", type=INT, default=4, show_default=True, help="trials of the short tuning study")
@click.option("--tune-epochs", type=INT, default=None, help="epochs per trial (default: the students' epochs)")
def demo(spec, n_trials, tune_epochs) -> None:
    """The whole product on the synthetic data: teacher, KD student + scratch twin, tuning, report.

    Everything already finished (same configuration) is reused, so a second run is quick.
    """
    from kdhar import tracking, tuning
    from kdhar.experiments import build_run_config, load_spec, run_grid
    from kdhar.report import build_report

    grid = load_spec(spec)
    tracking.check_server(tracking.tracking_uri())
    tracking.release_project_run({"role": "demo", "spec": str(spec)}, name="demo",
                                 description=f"Launched the demo ({spec}): its runs are in the experiment {grid.experiment}.")
    for root in _spec_roots(grid):
        ensure_data(root)
    click.echo(f"== 1/3 teacher, distilled student and its scratch twin ({spec})")
    outcomes = run_grid(spec, log=click.echo)
    teacher_run = next(o.run_id for o in outcomes if o.cell.role == "teacher")
    student = grid.students[0]
    overrides = {**grid.overrides, **({"epochs": tune_epochs} if tune_epochs else {})}
    cfg = build_run_config(
        student, size=grid.size, overrides=overrides, dataset=grid.dataset,
        fraction=grid.fractions[0], seed=grid.seeds[0], kd=grid.kd,
    )
    space = tuning.SearchSpace.default(grid.weighting)
    click.echo(f"== 2/3 tuning {', '.join(space.names())}: {n_trials} trials of up to {cfg.optim.epochs} epochs (median pruning)")
    summary = tuning.tune(
        cfg, teacher=f"runs:/{teacher_run}", n_trials=n_trials, study_name=f"{grid.experiment}-kd",
        space=space, pruner="median", experiment=grid.experiment, seed=0, cache_teacher=True, log=click.echo,
    )
    best = summary.get("best_params") or {}
    click.echo(f"best val acc {summary['best_value']} at " + ", ".join(f"{k}={v:.3g}" for k, v in best.items()))
    click.echo("== 3/3 report")
    report = build_report(grid.experiment, Path("reports") / grid.experiment)
    click.echo(report.text)
    click.echo(
        "\nSee every run, curve and model in the MLflow UI:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri()}\n  then open http://127.0.0.1:5000 and choose \"Model training\""
    )


def _explicit_clip(opts: dict[str, Any]) -> frozenset[str]:
    """The clip settings and modality given on the command line; the others come from a logged model's own run."""
    return frozenset(k for k in ("clip_len", "frame_interval", "crop", "modality") if opts.get(k) is not None)


def _spec_roots(spec) -> list[str]:
    roots = [spec.dataset.root] if getattr(spec, "dataset", None) else []
    transfer = getattr(spec, "transfer", None)
    if transfer is not None and getattr(spec, "finetune", False):
        roots.append(transfer.root)
    return roots


def _print_result(res) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the job
        return
    shown = {k: v for k, v in res.final.items() if isinstance(v, float)}
    click.echo(f"run {res.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))
    if res.model_uri:
        click.echo(f"model: {res.model_uri}")


if __name__ == "__main__":
    main()
