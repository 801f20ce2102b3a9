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
    for key in ("train_loss", "train_task_loss", "train_kd_loss", "val_loss", "test_loss"):
        if history and key in history[0]:
            ax_loss.plot(epochs, [h[key] for h in history], label=key)
    for key in ("train_acc", "val_video_top1", "test_video_top1", "test_clip_top1"):
        if history and key in history[0]:
            ax_acc.plot(epochs, [h[key] for h in history], label=key)
    ax_loss.set_xlabel("epoch")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylim(0, 1)
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    return fig
