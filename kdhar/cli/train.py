"""Commands that train a model: `train-teacher`, `distill`, `pretrain`, `finetune`; each may run
itself under torchrun (--nproc)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from kdhar import config as C
from kdhar.cli.data import ensure_data
from kdhar.cli.errors import UserError
from kdhar.cli.options import (
    _OptionalChoice,
    bool_option,
    build_config,
    check_crop_fits,
    explicit_clip,
    gkd_options,
    kd_options,
    kd_settings,
    launch_options,
    pcl_options,
    run_options,
    text_or_none,
)


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


@click.command("train-teacher")
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
    check_crop_fits(cfg, opts)
    if text_or_none(init):
        check_init_modality(text_or_none(init), cfg.model.modality)
    _launch(opts, cfg.optim.batch_size)
    res = run_training(cfg, role="teacher", experiment=opts["experiment"], resume=text_or_none(opts["resume"]),
                       init_state=load_init(text_or_none(init)) if text_or_none(init) else None, init=text_or_none(init),
                       allow_config_change=bool(opts["allow_config_change"]), device=opts["device"],
                       stage_models=opts["stage_models"])
    _print_result(res)


@click.command("distill")
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

    cfg = build_config(student, opts, kd=kd_settings(tau, kd_weighting, alpha, lam, opts["ssl"]))
    ensure_data(cfg.data.root)
    check_crop_fits(cfg, opts)
    _launch(opts, cfg.optim.batch_size)
    res = D.distill(
        cfg, teacher=teacher, init=text_or_none(init), experiment=opts["experiment"], resume=text_or_none(opts["resume"]),
        allow_config_change=bool(opts["allow_config_change"]),
        device=opts["device"], cache_teacher=bool(cache_teacher), stage_models=opts["stage_models"],
    )
    _print_result(res)


@click.command("pretrain")
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
    check_crop_fits(cfg, opts)
    _launch(opts, cfg.optim.batch_size)
    res = run_training(cfg, role="pretrain", experiment=opts["experiment"], objective=build_objective(cfg, labels=False),
                       resume=text_or_none(opts["resume"]), allow_config_change=bool(opts["allow_config_change"]),
                       device=opts["device"], stage_models=opts["stage_models"])
    _print_result(res)


@click.command("finetune")
@click.option("--model", "model_uri", required=True, help="models:/ or runs:/ URI of the model to transfer")
@click.option("--protocol", type=_OptionalChoice(C.FINETUNE_PROTOCOLS), default=None,
              help="pcl: PCL's code's fine-tuning (no colour augmentation or flip, lr x0.1 after 30 epochs without a "
                   "lower validation loss, the lowest-validation-loss epoch's test accuracy as sel_acc_late; at size "
                   "paper lr 1e-3, batch 8, 150 epochs); plain: as any supervised run (default: pcl for a model "
                   "trained inside PCL, else plain)")
@launch_options
@run_options
def finetune_cmd(model_uri: str, protocol: str | None, **opts) -> None:
    """Fine-tune a logged model on another dataset (its classifier is replaced)."""
    from kdhar.finetune import default_protocol, finetune

    if protocol is None:
        from kdhar import tracking

        tracking.check_server(tracking.tracking_uri())  # one line now, rather than MLflow's retries
        protocol = default_protocol(model_uri)
    # the architecture and width come from the source model
    cfg = build_config("c3d", {**opts, "finetune_protocol": protocol})
    ensure_data(cfg.data.root)
    check_crop_fits(cfg, opts)
    _launch(opts, cfg.optim.batch_size)
    res = finetune(model_uri, cfg, experiment=opts["experiment"], resume=text_or_none(opts["resume"]),
                   allow_config_change=bool(opts["allow_config_change"]), device=opts["device"],
                   explicit=explicit_clip(opts), stage_models=opts["stage_models"])
    _print_result(res)


def _print_result(res) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the job
        return
    shown = {k: v for k, v in res.final.items() if isinstance(v, float)}
    click.echo(f"run {res.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))
    if res.model_uri:
        click.echo(f"model: {res.model_uri}")


COMMANDS = (train_teacher, distill, pretrain_cmd, finetune_cmd)
