"""Which checkpoint a run continues from, and whether it may: the checks before any training."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from kdhar import distributed, tracking
from kdhar.checkpoint import load_checkpoint
from kdhar.config import RunConfig
from kdhar.training.identity import HASH_NEUTRAL

# Knobs a resumed run may change freely (how data is read, not what is trained) and those it may
# change only when asked to (`allow_config_change`): more epochs, another thread count.
RESUME_FREE = {"data.num_workers", "data.on_missing", "data.on_bad"}
RESUME_ALLOWED = {"optim.epochs", "optim.threads"}


class ResumeError(ValueError):
    """A checkpoint that cannot continue as asked; the message names the checkpoint and the fix."""


def stored_config(cfg: RunConfig, kd: bool) -> dict[str, Any]:
    """The configuration as a checkpoint stores it (plain types only: tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.params(kd=kd).items()}


def check_resume(
    path: str | Path, state: dict[str, Any], cfg: RunConfig, kd: bool, allow: bool, finished: bool
) -> dict[str, tuple]:
    """The configuration changes between a checkpoint and the command resuming it, as key -> (was,
    now), once they are acceptable. `finished`: the checkpoint's MLflow run ended FINISHED.

    Raises:
        ResumeError: a change other than RESUME_FREE (and, with `allow`, RESUME_ALLOWED), or a
            finished run that has no epochs left to train.
    """
    missing = object()
    # Checkpoints from before a knob existed were at its neutral value.
    stored = {**HASH_NEUTRAL, **state.get("config", {})}
    wanted = stored_config(cfg, kd)
    changed = {k: (stored[k], v) for k, v in wanted.items()
               if k not in RESUME_FREE and stored.get(k, missing) not in (missing, v)}
    refused = {k: c for k, c in changed.items() if not (allow and k in RESUME_ALLOWED)}
    if refused:
        diff = ", ".join(f"{k} {was!r} -> {now!r}" for k, (was, now) in sorted(refused.items()))
        hint = (f"; only {', '.join(sorted(RESUME_ALLOWED))} may change, with --allow-config-change"
                if not set(refused) - RESUME_ALLOWED else "; add --allow-config-change to accept this")
        raise ResumeError(f"--resume {path}: the run was trained with other settings ({diff}); give the "
                          f"same options to continue it, or leave --resume out to start a new run{hint}")
    if finished and state["epoch"] >= cfg.optim.epochs:
        raise ResumeError(f"--resume {path}: run {state.get('run_id')} already trained all {state['epoch']} epochs; "
                          "nothing to continue (to train longer: --epochs N --allow-config-change)")
    return changed


def checkpoint_to_resume(
    cfg: RunConfig, label: str, kd: bool, ddp: distributed.Distributed | None, resume: str | None,
    workdir: str | Path, allow_config_change: bool,
) -> tuple[str | None, dict[str, Any] | None, dict[str, tuple]]:
    """(checkpoint path, its state, accepted configuration changes) of the run to continue, if any.

    A torchrun job that restarted (its earlier attempt died) continues from rank 0's last checkpoint.
    Rank 0 reads and checks the checkpoint and hands it on: the ranks must continue from one
    state, and rank 0's files need not be on the other nodes. `label` prefixes the restart message.
    """
    main = ddp is None or ddp.main
    if ddp is not None:
        if main and not resume and ddp.restarts:
            resume = distributed.job_checkpoint(workdir)
            if resume:
                print(f"[{label}] restarted job: resuming from {resume}", file=sys.stderr, flush=True)
        elif main and not ddp.restarts:
            distributed.forget_job(workdir)
    state = load_checkpoint(resume) if resume and main else None
    changed = {}
    if state is not None:
        finished = tracking.run_status(state["run_id"]) == "FINISHED"
        changed = check_resume(resume, state, cfg, kd, allow_config_change, finished)
    if ddp is not None:
        state, resume = ddp.broadcast_object((state, resume))
    return resume, state, changed


# An --init that fills less than this share of the model's tensors is refused: the run would be a
# scratch run in all but name (a PCL encoder loaded into another architecture matched 2-21 of 122).
# Between this and 100 % a warning says how much loaded (a new classifier is always left out).
INIT_MIN_SHARE = 0.5


def load_init_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> float:
    """Loads the tensors of `state` that fit `model` and returns the share of the model they fill.

    Raises:
        ValueError: the share is below INIT_MIN_SHARE; the message names `source` and the counts.
    """
    own = model.state_dict()
    skipped = set(load_compatible(model, state))
    matched = sum(k in own and k not in skipped for k in state)
    share = matched / max(1, len(own))
    if share < INIT_MIN_SHARE:
        raise ValueError(f"--init {source} fits only {matched} of the model's {len(own)} tensors ({share:.0%}, below "
                         f"{INIT_MIN_SHARE:.0%}): start from a model of the same architecture, width and modality")
    if matched < len(own):
        print(f"warning: --init {source} fills {matched} of the model's {len(own)} tensors ({share:.0%}); the rest "
              "start from random weights", file=sys.stderr, flush=True)
    return share


def load_compatible(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Loads matching weights; tensors whose shape differs (a new classifier) are skipped and returned."""
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped
