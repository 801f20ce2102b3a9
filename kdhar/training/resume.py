"""Which checkpoint a run continues from, and whether it may: the checks before any training."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdhar import distributed, tracking
from kdhar.checkpoint import load_checkpoint
from kdhar.config import RunConfig
from kdhar.objectives import Objective
from kdhar.training.identity import HASH_NEUTRAL

# Knobs a resumed run may change freely (how data is read, not what is trained) and those it may
# change only when asked to (`allow_config_change`): more epochs, another thread count.
RESUME_FREE = {"data.num_workers", "data.on_missing", "data.on_bad"}
RESUME_ALLOWED = {"optim.epochs", "optim.threads"}


class ResumeError(ValueError):
    """A checkpoint that cannot continue as asked; the message names the checkpoint and the fix."""


# The command that trains each role, for the hint of a refused resume.
ROLE_COMMANDS = {"teacher": "kdhar train-teacher", "student": "kdhar distill", "pretrain": "kdhar pretrain",
                 "finetune": "kdhar finetune"}


def run_identity(role: str, objective: Objective) -> dict[str, str]:
    """What a run is beyond its knobs, as its checkpoint records it: its role, its method (the
    objective's name: supervised, kd-logit, gkd, pcl, ...) and its teacher (URI and run id, empty
    without one; a checkpoint file as its absolute path). The knobs alone cannot tell a KD run
    from its `--teacher none` twin, a teacher from a scratch student, or one teacher from another."""
    teacher = objective.teacher
    uri = "" if teacher is None else teacher.uri
    if uri and not uri.startswith(("models:/", "runs:/")):
        uri = str(Path(uri).resolve())
    return {"role": role, "method": objective.name, "teacher_uri": uri,
            "teacher_run_id": (teacher.run_id or "") if teacher is not None else ""}


def check_identity(path: str | Path, state: dict[str, Any], now: dict[str, str]) -> None:
    """Refuses continuing a checkpoint as another kind of run: another role, method or teacher.
    Checkpoints from before the identity was recorded are not checked.

    Raises:
        ResumeError: one line with each difference (was -> now) and the command that continues it.
    """
    was = state.get("identity")
    if not was:
        return
    diffs = [f"{key} {was[key]} -> {now[key]}" for key in ("role", "method") if was[key] != now[key]]
    if _teacher_key(was) != _teacher_key(now):
        diffs.append(f"teacher {_teacher_text(was)} -> {_teacher_text(now)}")
    if diffs:
        command = ROLE_COMMANDS.get(was["role"], f"the command of a {was['role']} run")
        if was["role"] == "student":
            command += f" --teacher {_teacher_spec(was)}"
        raise ResumeError(f"--resume {path}: the checkpoint is of another kind of run ({', '.join(diffs)}); continue "
                          f"it with {command} and the options that trained it (method {was['method']}), or leave "
                          "--resume out to start a new run")


def _teacher_key(identity: dict[str, str]) -> tuple[str, str]:
    """Equal for the same teacher: a logged model by its run (whichever models:/ or runs:/ URI
    names it), a checkpoint file by its path."""
    uri, run_id = identity["teacher_uri"], identity["teacher_run_id"]
    if uri.startswith(("models:/", "runs:/")) and run_id:
        return "run", run_id
    return "file", uri


def _teacher_text(identity: dict[str, str]) -> str:
    uri, run_id = identity["teacher_uri"], identity["teacher_run_id"]
    if not uri:
        return "none"
    return uri if not run_id or run_id in uri else f"{uri} (run {run_id})"


def _teacher_spec(identity: dict[str, str]) -> str:
    """The --teacher value that gives the recorded teacher again (an alias may have moved on)."""
    uri, run_id = identity["teacher_uri"], identity["teacher_run_id"]
    if not uri:
        return "none"
    return f"runs:/{run_id}" if uri.startswith(("models:/", "runs:/")) and run_id else uri


def stored_config(cfg: RunConfig, kd: bool) -> dict[str, Any]:
    """The configuration as a checkpoint stores it (plain types only: tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.params(kd=kd).items()}


def check_resume(
    path: str | Path, state: dict[str, Any], cfg: RunConfig, identity: dict[str, str], allow: bool,
    finished: Callable[[], bool],
) -> dict[str, tuple]:
    """The configuration changes between a checkpoint and the command resuming it, as key -> (was,
    now), once they are acceptable. `identity`: the resuming run's (`run_identity`); `finished()`:
    whether the checkpoint's MLflow run ended FINISHED (asked only when no epoch is left).

    Raises:
        ResumeError: another role, method or teacher (`check_identity`); fewer epochs than the
            checkpoint has trained; a change other than RESUME_FREE (and, with `allow`,
            RESUME_ALLOWED); a finished run with no epochs left. The hint says what would be accepted.
    """
    check_identity(path, state, identity)
    done = state["epoch"]
    if done > cfg.optim.epochs:  # never acceptable, so said before any other difference
        raise ResumeError(f"--resume {path}: the checkpoint has trained {done} epochs, more than --epochs "
                          f"{cfg.optim.epochs}: give --epochs {done} or more")
    missing = object()
    # Checkpoints from before a knob existed were at its neutral value.
    stored = {**HASH_NEUTRAL, **state.get("config", {})}
    wanted = stored_config(cfg, kd=bool(identity["teacher_uri"]))
    changed = {k: (stored[k], v) for k, v in wanted.items()
               if k not in RESUME_FREE and stored.get(k, missing) not in (missing, v)}
    refused = {k: c for k, c in changed.items() if not (allow and k in RESUME_ALLOWED)}
    if refused:
        diff = ", ".join(f"{k} {was!r} -> {now!r}" for k, (was, now) in sorted(refused.items()))
        hint = ("add --allow-config-change true to accept this" if set(refused) <= RESUME_ALLOWED else
                f"only {', '.join(sorted(RESUME_ALLOWED))} may change (with --allow-config-change true)")
        raise ResumeError(f"--resume {path}: the run was trained with other settings ({diff}); give the "
                          f"same options to continue it, or leave --resume out to start a new run; {hint}")
    if done == cfg.optim.epochs and finished():
        raise ResumeError(f"--resume {path}: run {state.get('run_id')} already trained all {done} epochs; nothing to "
                          f"continue (to train it longer: --epochs {done + 1} or more with --allow-config-change true)")
    return changed


def checkpoint_to_resume(
    cfg: RunConfig, label: str, identity: dict[str, str], ddp: distributed.Distributed | None, resume: str | None,
    workdir: str | Path, allow_config_change: bool,
) -> tuple[str | None, dict[str, Any] | None, dict[str, tuple]]:
    """(checkpoint path, its state, accepted configuration changes) of the run to continue, if any.

    A torchrun job that restarted (its earlier attempt died) continues from rank 0's last checkpoint.
    Rank 0 reads and checks the checkpoint and hands it on: the ranks must continue from one
    state, and rank 0's files need not be on the other nodes. `label` prefixes the restart message;
    `identity` is the resuming run's (`run_identity`).
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
        changed = check_resume(resume, state, cfg, identity, allow_config_change,
                               lambda: tracking.run_status(state["run_id"]) == "FINISHED")
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
