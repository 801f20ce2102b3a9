"""Training and evaluation loops, learning-rate schedules, seeding and RNG state.

There is no tracking import here: per-step metrics leave through a `log(metrics, step)` callback,
so the loops run (and are tested) without MLflow.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import Tensor, nn
from tqdm import tqdm

LogFn = Callable[[dict[str, float], int], None]
# Key prefix of the metrics logged every `log_every` steps (means over that window of steps). MLflow's
# chart views sort a section's charts by key and put "group/"-prefixed sections above the ungrouped
# metrics, so a prefix that sorts after every per-epoch key (test_*, train_*, val_*) keeps these
# noisy curves, whose loss scale differs between objectives, below the accuracies.
WINDOW = "window_"
SCHEDULES = ("cosine", "step", "constant", "plateau")
# What a window batch (`kdhar.data.window_dataset.collate_windows`) hands a detection step besides
# the clips: per-window lists, kept on the CPU where the step builds its targets.
WINDOW_FIELDS = ("segments", "labels", "ambiguous", "valid_steps")


def pick_device(name: str | None = None) -> torch.device:
    """"auto" (or None): CUDA when available, else the CPU; otherwise the named device.

    Raises:
        ValueError: not a device name torch knows, or CUDA asked for on a machine without it.
    """
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device; use auto or cpu")
    return device


def resolve_amp_dtype(device: torch.device | str, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype to use, or None for full precision.

    None picks the device default: bfloat16 on CUDA (no loss scaling needed), full precision on CPU.
    """
    if amp_dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    if amp_dtype == torch.float32:
        return None
    if amp_dtype == torch.float16:
        raise ValueError("amp dtype float16 needs loss scaling, which this engine does not do; use bfloat16")
    return amp_dtype


def uses_channels_last(device: torch.device | str) -> bool:
    """Whether the loops lay clips and weights out as channels_last_3d on `device`: on CUDA, where
    cuDNN's 3D convolutions prefer it (`kdhar bench gpu` measures whether they do)."""
    return torch.device(device).type == "cuda"


def _inputs(batch: Mapping[str, Any], device: torch.device,
            channels_last: bool | None = None) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """The step's inputs: a clip batch (N, 3, T, H, W), a tuple batch ("clips", (N, L, 3, T, H, W))
    whose pretext labels and dataset indices go along as extras, or a window batch, which has no
    labels (None) and hands its segments on as extras. `channels_last` None: the device's default
    (`uses_channels_last`)."""
    # non_blocking only overlaps the copy when the loader pinned the memory; otherwise it is a no-op.
    tuples = "clips" in batch
    x = batch["clips" if tuples else "clip"].to(device, non_blocking=True)
    if channels_last is None:
        channels_last = uses_channels_last(device)
    if channels_last and not tuples:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if "segments" in batch:
        return x, None, {name: batch[name] for name in WINDOW_FIELDS}
    y = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
    extra = {}
    for name in ("teacher_logits", *(("pretext", "index") if tuples else ())):
        if name in batch:
            extra[name] = torch.as_tensor(batch[name]).to(device, non_blocking=True)
    return x, y, extra


def train_step(
    step: nn.Module,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    max_grad_norm: float = 0.0,
    grad_sync: Callable[[list[Tensor]], None] | None = None,
    channels_last: bool | None = None,
) -> dict[str, Tensor | int]:
    """One optimisation step on one batch; `max_grad_norm` > 0 clips the gradient's L2 norm;
    `grad_sync(params)` runs between backward and clipping (data-parallel training averages the
    gradients over its processes there).

    `channels_last` lays the clip batch out as channels_last_3d (None: on CUDA only, as the loops
    do); the step's weights are the caller's to lay out.

    Returns:
        The step's detached losses (every "*loss" entry), "correct" (top-1 hits of "output" against
        the step's "target", else the labels) and the step's own "*_correct" counts, as tensors
        left on `device`, so that no GPU synchronisation happens here, "clips" (an int) and
        "scored" (how many predictions "correct" counts over: the clips, or a detection step's
        positive steps).
    """
    device = torch.device(device)
    dtype = resolve_amp_dtype(device, amp_dtype)
    x, y, extra = _inputs(batch, device, channels_last)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = step(x, y, **extra)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if grad_sync is not None or max_grad_norm > 0:  # gathered only when something needs them
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if grad_sync is not None:
            grad_sync(params)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    result: dict[str, Tensor | int] = {k: v.detach() for k, v in out.items() if k.endswith(("loss", "_correct"))}
    target = out.get("target", y)
    result["correct"] = (out["output"].detach().argmax(dim=1) == target).sum()
    result["clips"] = int(x.shape[0])
    result["scored"] = int(target.shape[0])
    return result


def train_one_epoch(
    step: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    log: LogFn | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    epoch: int = 0,
    log_every: int = 10,
    max_grad_norm: float = 0.0,
    grad_sync: Callable[[list[Tensor]], None] | None = None,
) -> dict[str, float]:
    """Trains `step` for one pass over `loader`.

    Args:
        step: a step module (`SupervisedStep`, `KDStep`, ...) already on `device`; on CUDA it is
            switched to channels_last_3d, the layout the inputs get.
        loader: yields dicts with "clip" (N, 3, T, H, W), "label" (N,), and optionally "skipped"
            (bad samples dropped by the collate function) and "teacher_logits" (a logit cache).
        optimizer: optimises the step's parameters.
        device: where the batches go.
        scheduler: stepped after every optimisation step.
        log: called as `log(metrics, global_step)` every `log_every` steps with the window's train
            top-1 ("window_acc", first), mean losses ("window_loss", ...) and the learning rate used ("lr").
        amp_dtype: autocast dtype; None means bfloat16 on CUDA and full precision on CPU.
        progress: show a tqdm bar (only when stderr is a terminal).
        epoch: numbers the bar and the global step passed to `log`.
        log_every: steps between `log` calls and progress-bar updates.
        max_grad_norm: clip each step's gradient to this L2 norm; 0 leaves it alone.
        grad_sync: see `train_step` (data-parallel gradient averaging).

    Returns:
        Clip-weighted means of every loss the step returns, "first_<loss>" (each loss on the first
        batch, before any step: where a run starts from), "acc" (train top-1), "clips",
        "clips_per_s", "seconds" and "skipped".

    Raises:
        FloatingPointError: the loss became NaN or infinite.
    """
    device = torch.device(device)
    step.train()
    if uses_channels_last(device):
        step.to(memory_format=torch.channels_last_3d)
    steps_per_epoch = len(loader) if isinstance(loader, Sized) else None
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, disable=not progress or not sys.stderr.isatty())
    totals: dict[str, Tensor | int] = {}
    window: dict[str, Tensor | int] = {}
    skipped = 0
    first: dict[str, Tensor] = {}
    start = window_start = time.perf_counter()
    i = -1
    for i, batch in enumerate(loader):
        lr = optimizer.param_groups[0]["lr"]
        result = train_step(step, batch, optimizer, device, amp_dtype, max_grad_norm, grad_sync)
        if i == 0:
            first = {f"first_{k}": v for k, v in result.items() if isinstance(k, str) and k.endswith("loss")}
        if scheduler is not None:
            scheduler.step()
        skipped += int(batch.get("skipped", 0))
        _accumulate(result, totals, window)
        bar.update(1)
        if (i + 1) % log_every == 0:
            means = _window_means(window, epoch, i)
            clips_per_s = float(window["clips"]) / (time.perf_counter() - window_start)
            bar.set_postfix(loss=f"{means['loss']:.3f}", clips_s=f"{clips_per_s:.1f}")
            if log is not None:
                global_step = epoch * steps_per_epoch + i + 1 if steps_per_epoch else i + 1
                log(_window_metrics(window, means) | {"lr": lr}, global_step)
            window, window_start = {}, time.perf_counter()
    bar.close()
    if i < 0:
        raise ValueError("the training loader yielded no batches: check the dataset size and batch size")
    return _epoch_summary(totals, first, epoch, i, time.perf_counter() - start, skipped)


def _accumulate(result: dict[str, Tensor | int], *sums: dict[str, Tensor | int]) -> None:
    """Adds one step's results to each of `sums`: losses weighted by the step's clips (so the sums
    divide into clip-weighted means), "*correct" counts as they are, and the clips themselves."""
    clips = result.pop("clips")
    weighted = {k: v if k.endswith("correct") or k == "scored" else v * clips for k, v in result.items()}
    weighted["clips"] = clips
    for acc in sums:
        for k, v in weighted.items():
            acc[k] = acc[k] + v if k in acc else v


def _epoch_summary(totals: dict[str, Tensor | int], first: dict[str, Tensor], epoch: int, i: int, seconds: float,
                   skipped: int) -> dict[str, float]:
    """`train_one_epoch`'s return value from the epoch's sums."""
    means = _window_means(totals, epoch, i)  # the .item() calls also wait for queued GPU work
    n = int(totals["clips"])
    accs = {f"{k.removesuffix('_correct')}_acc": float(v) / n for k, v in totals.items() if k.endswith("_correct")}
    return means | {k: float(v) for k, v in first.items()} | accs | {
        "acc": float(totals["correct"]) / max(1, int(totals.get("scored", n))),
        "clips": n,
        "clips_per_s": n / seconds,
        "seconds": seconds,
        "skipped": skipped,
    }


def _window_metrics(window: dict[str, Tensor | int], means: dict[str, float]) -> dict[str, float]:
    """The window's logged metrics: its accuracy first, as MLflow's compare page plots the first
    metric a run logged (on a SQLite store) by default, then its mean losses."""
    accuracy = {f"{WINDOW}acc": float(window["correct"]) / max(1.0, float(window.get("scored", window["clips"])))}
    return accuracy | {f"{WINDOW}{k}": v for k, v in means.items()}


def _window_means(sums: dict[str, Tensor | int], epoch: int, i: int) -> dict[str, float]:
    n = float(sums["clips"])
    means = {k: float(v) / n for k, v in sums.items() if k.endswith("loss")}
    if not math.isfinite(means["loss"]):
        raise FloatingPointError(
            f"training loss became {means['loss']} by epoch {epoch} step {i + 1}: lower the learning rate"
        )
    return means


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device | str,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Clip- and video-level accuracy of `model` on `loader`.

    A video's score is the mean of its clips' softmax scores; clips belong to the same video when
    their `batch["index"]` is equal. On CUDA the model is switched to channels_last_3d.

    Returns:
        "clip_top1", "clip_top5" (top-k with k = min(5, num_classes)), "video_top1",
        "mean_class_acc" (video level, over classes that have test videos), "loss" (clip-level
        mean CE), "confusion" (video level, int ndarray [true, predicted]), "per_class" (a list of
        {"class", "precision", "recall", "f1", "support"} at video level), "clips", "videos",
        "skipped".
    """
    device = torch.device(device)
    dtype = resolve_amp_dtype(device, amp_dtype)
    model.eval()
    if uses_channels_last(device):
        model.to(memory_format=torch.channels_last_3d)
    k = min(5, num_classes)
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    topk = torch.zeros((), device=device, dtype=torch.long)
    probs, labels, indices = [], [], []
    skipped = 0
    for batch in loader:
        x, y, _ = _inputs(batch, device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).float()
        if logits.shape[1] != num_classes:
            raise ValueError(f"model produces {logits.shape[1]} logits but num_classes is {num_classes}")
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        best = logits.topk(k, dim=1).indices
        top1 += (best[:, 0] == y).sum()
        topk += (best == y[:, None]).any(dim=1).sum()
        # Kept on the device until the end: a copy per batch would stall the GPU each time.
        probs.append(logits.softmax(dim=1))
        labels.append(y)
        indices.append(torch.as_tensor(batch["index"]).cpu())
        skipped += int(batch.get("skipped", 0))
    if not probs:
        raise ValueError("the evaluation loader yielded no batches: check the dataset")
    n_clips = sum(len(y) for y in labels)
    video_labels, video_pred = _video_votes(probs, labels, indices, num_classes)
    return {
        "clip_top1": float(top1) / n_clips,
        "clip_top5": float(topk) / n_clips,
        "video_top1": float((video_pred == video_labels).mean()),
        "loss": float(loss_sum) / n_clips,
        **_video_scores(video_labels, video_pred, num_classes),
        "clips": n_clips,
        "videos": len(video_labels),
        "skipped": skipped,
    }


def _video_votes(probs: list[Tensor], labels: list[Tensor], indices: list[Tensor],
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(label, prediction) per video: a video's score is the mean of its clips' softmax scores.

    Raises:
        ValueError: clips of one video carry different labels.
    """
    clip_probs = torch.cat(probs).double().cpu().numpy()
    clip_labels = torch.cat(labels).cpu().numpy()
    videos, inverse = np.unique(torch.cat(indices).numpy(), return_inverse=True)
    video_scores = np.zeros((len(videos), num_classes))
    np.add.at(video_scores, inverse, clip_probs)
    video_scores /= np.bincount(inverse)[:, None]
    video_labels = np.empty(len(videos), dtype=clip_labels.dtype)
    video_labels[inverse] = clip_labels
    mismatch = np.flatnonzero(video_labels[inverse] != clip_labels)
    if mismatch.size:
        raise ValueError(f"clips of video index {videos[inverse[mismatch[0]]]} carry different labels")
    return video_labels, video_scores.argmax(axis=1)


def _video_scores(video_labels: np.ndarray, video_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Mean class accuracy (over classes that have videos), the confusion matrix and per-class scores."""
    classes = list(range(num_classes))
    confusion = confusion_matrix(video_labels, video_pred, labels=classes)
    support = confusion.sum(axis=1)
    present = support > 0
    mean_class_acc = float((confusion.diagonal()[present] / support[present]).mean())
    precision, recall, f1, sup = precision_recall_fscore_support(
        video_labels, video_pred, labels=classes, zero_division=0
    )
    per_class = [
        {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, p, r, f, s in zip(classes, precision, recall, f1, sup)
    ]
    return {"mean_class_acc": mean_class_acc, "confusion": confusion, "per_class": per_class}


@torch.inference_mode()
def evaluate_terms(step: nn.Module, loader: Iterable[Mapping[str, Any]], device: torch.device | str,
                   amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Means over `loader` of what `step.validate(x, y, **extra)` returns: every "*loss" term
    (batch-weighted) and every "*_correct" count as "*_acc" (e.g. PCL's pretext validation)."""
    device = torch.device(device)
    dtype = resolve_amp_dtype(device, amp_dtype)
    step.eval()
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        x, y, extra = _inputs(batch, device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = step.validate(x, y, **extra)
        size = int(y.shape[0])
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v) * (1 if k.endswith("_correct") else size)
        n += size
    if n == 0:
        raise ValueError("the validation loader yielded no batches: check the dataset")
    return {(f"{k.removesuffix('_correct')}_acc" if k.endswith("_correct") else k): v / n for k, v in sums.items()}


def get_lr(step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int = 0) -> float:
    """Learning rate after `step` of `total_steps` optimisation steps.

    The first `warmup_steps` rise linearly from base_lr / warmup_steps to base_lr (the paper uses
    none; at the CE-tuned lr the KD term's large early gradient needs one, see config.OptimConfig).
    Then cosine: half a cosine from base_lr to 0; step: x0.1 at 50 % and again at 75 % of training;
    constant and plateau: base_lr (plateau's reductions are `Plateau`'s, applied on top). The schedule
    runs over the whole of training, warm-up included, so a warm-up does not change where the decay lands.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(max(step, 0), total_steps) / total_steps
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return base_lr * 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    if schedule in ("constant", "plateau"):
        return base_lr
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


class Plateau:
    """ReduceLROnPlateau's rule as a scale on the schedule (PCL's Table 1 settings): after `patience`
    epochs without a new minimum of the watched loss, the lr is multiplied by `factor`, down to
    `min_lr`. A new minimum must be below the best by more than the relative `threshold` (torch's
    default 1e-4, "rel" mode, which PCL's code keeps), so a loss creeping down by less still counts
    as a plateau. Stepped once per epoch; its state is plain numbers (checkpointed with the run)."""

    def __init__(self, base_lr: float, factor: float = 0.1, patience: int = 50, min_lr: float = 1e-5,
                 threshold: float = 1e-4) -> None:
        self.min_scale = min(1.0, min_lr / base_lr)
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.scale, self.best, self.bad = 1.0, math.inf, 0

    def step(self, value: float) -> None:
        if value < self.best * (1 - self.threshold):
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad > self.patience:
            self.scale, self.bad = max(self.min_scale, self.scale * self.factor), 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.scale, self.best, self.bad = float(state["scale"]), float(state["best"]), int(state["bad"])


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0,
    plateau: Plateau | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler that scales each group's initial lr by `get_lr(step, ...)` (times
    `plateau.scale` when given)."""
    get_lr(total_steps, total_steps, 1.0, schedule)  # fail now on a bad name, not at the first step
    scale = (lambda: plateau.scale) if plateau is not None else (lambda: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: get_lr(s, total_steps, 1.0, schedule, warmup_steps) * scale()
    )


def set_determinism(seed: int, deterministic: bool) -> str:
    """Seeds Python, NumPy and torch (all devices) and selects deterministic kernels if asked.

    Returns:
        A note on what remains non-deterministic, worth recording with the run.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if not deterministic:
        torch.use_deterministic_algorithms(False)
        return "non-deterministic kernels allowed (cuDNN autotuning on): repeated runs differ slightly"
    # cuBLAS reads this when it initialises; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: 3D max-pool backward has no deterministic CUDA kernel, and failing would rule out C3D.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        return (
            "deterministic kernels except max_pool3d backward on CUDA (C3D, tiny3d), which has none: "
            "their runs can differ in the last bits"
        )
    return "deterministic kernels on CPU: repeated runs match for the same thread count and torch build"


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain lists/ints/bytes (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": bytes(torch.get_rng_state().numpy()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [bytes(s.numpy()) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores states captured by `rng_state()`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in state["cuda"]])
