"""Matplotlib figures logged as run artifacts (headless: the Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def confusion_figure(confusion: np.ndarray, classes: list[str]) -> Figure:
    """Row-normalised confusion matrix (rows: true class) with class names on both axes."""
    counts = np.asarray(confusion, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
    ax.set_yticks(ticks, classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def curves_figure(history: list[dict[str, float]]) -> Figure:
    """Loss and accuracy per epoch."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "train_task_loss", "train_kd_loss", "train_cls_loss", "train_reg_loss", "val_loss",
                "test_loss"):
        if history and key in history[0]:
            ax_loss.plot(epochs, [h[key] for h in history], label=key)
    for key in ("train_acc", "val_video_top1", "test_video_top1", "test_clip_top1", "val_map_avg", "test_map_avg",
                "test_gkd_map_avg"):
        if history and key in history[0]:
            ax_acc.plot(epochs, [h[key] for h in history], label=key)
    ax_loss.set_xlabel("epoch")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylim(0, 1)
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    return fig


def timelines_figure(videos: list[dict], classes: list[str]) -> Figure:
    """Predicted against true segments, one panel per video: the truth on the lower lane, the
    detections on the upper one (opacity = score), each coloured by class.

    Args:
        videos: dicts with "name", "duration" (seconds), "truth" [(label, start, end)] and
            "predicted" [(label, start, end, score)].
        classes: class names by label.
    """
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(len(videos), 1, figsize=(10, 1.3 * len(videos) + 0.8), squeeze=False)
    shown: set[int] = set()
    for ax, video in zip(axes[:, 0], videos):
        for lane, rows in ((0, [(*r, 1.0) for r in video["truth"]]), (1, video["predicted"])):
            for label, start, end, score in rows:
                ax.broken_barh([(start, end - start)], (lane + 0.1, 0.8), color=colours(int(label) % 20),
                               alpha=max(0.15, float(score)))
                shown.add(int(label))
        ax.set_xlim(0, video["duration"])
        ax.set_ylim(0, 2)
        ax.set_yticks([0.5, 1.5], ["true", "predicted"])
        ax.set_title(video["name"], fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds")
    handles = [Patch(color=colours(k % 20), label=classes[k]) for k in sorted(shown)]
    if handles:
        fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=min(4, len(handles)))
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return fig
