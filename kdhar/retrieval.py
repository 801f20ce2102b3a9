"""Clip retrieval, a label-free measure of an encoder (PCL's `retrieve_clips.py` protocol).

Every test video is a query against every video of the training list (whatever share of it a run
trained on): a query is a hit at k when one of its k nearest training videos (cosine similarity of
their features) has its class. A video's feature is the mean over its clips of the last feature map
max-pooled over (1, 2, 2) and flattened, as upstream does for R3D's conv5 (`MaxPool3d((1, 2, 2))`,
which drops an odd last row and column: 512 x 2 x 3 x 3 = 9,216-d at 112x112), here for any trunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TOP_K = (1, 5, 10, 20, 50)


def clip_feature(maps: Tensor, pool: str = "floor") -> Tensor:
    """(N, C, T, H, W) feature maps -> (N, D): max-pooled over (1, 2, 2), flattened.

    `pool` "floor" is upstream's pooling (an odd last row and column are dropped: 7x7 -> 3x3);
    "ceil" keeps them (7x7 -> 4x4, 16,384-d for R3D at 112x112). A map 1 wide, which flooring
    would empty (a narrow trunk at a small crop), is pooled as "ceil"."""
    ceil = pool == "ceil" or min(maps.shape[-2:]) < 2
    return F.max_pool3d(maps, kernel_size=(1, 2, 2), ceil_mode=ceil).flatten(1)


@torch.inference_mode()
def video_features(model: nn.Module, loader: Iterable[Mapping[str, Any]], device: torch.device | str,
                   pool: str = "floor") -> tuple[np.ndarray, np.ndarray]:
    """Mean clip feature per video and its label, videos in order of their dataset index.

    Args:
        model: has `forward_features(x)` (a `VideoClassifier`).
        loader: batches with "clip", "label" and "index" (several clips may share an index).
        pool: see `clip_feature`.
    """
    device = torch.device(device)
    model.eval()
    feats, labels, indices = [], [], []
    for batch in loader:
        x = batch["clip"].to(device)
        feats.append(clip_feature(model.forward_features(x), pool).float().cpu())
        labels.append(torch.as_tensor(batch["label"]).cpu())
        indices.append(torch.as_tensor(batch["index"]).cpu())
    if not feats:
        raise ValueError("the retrieval loader yielded no batches: check the dataset")
    clip_feats = torch.cat(feats).double().numpy()
    videos, inverse = np.unique(torch.cat(indices).numpy(), return_inverse=True)
    sums = np.zeros((len(videos), clip_feats.shape[1]))
    np.add.at(sums, inverse, clip_feats)
    video_labels = np.empty(len(videos), dtype=np.int64)
    video_labels[inverse] = torch.cat(labels).numpy()
    return sums / np.bincount(inverse)[:, None], video_labels


def topk_hits(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray,
              ks: Sequence[int] = TOP_K) -> dict[str, float]:
    """Share of queries with a same-class gallery item among their k most cosine-similar, per k
    ("retrieval_top<k>"), for the k below the gallery's size only: from there on every query sees the
    whole gallery, a hit whenever its class is in it, whatever the features (top-20 and top-50 of a
    12-video gallery would read as perfect retrieval)."""
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    similarity = unit(query) @ unit(gallery).T
    order = np.argsort(-similarity, axis=1, kind="stable")
    same = gallery_labels[order] == query_labels[:, None]
    return {f"retrieval_top{k}": float(same[:, :k].any(axis=1).mean()) for k in ks if k < len(gallery)}


Features = tuple[np.ndarray, np.ndarray]  # (videos, D) features and the videos' labels


def retrieval(model: nn.Module, train_loader, test_loader, device: torch.device | str,
              ks: Sequence[int] = TOP_K, pool: str = "floor") -> dict[str, float]:
    """Top-k retrieval of the test videos against the training videos (see the module docstring),
    with the number of videos on each side (`retrieval_gallery_videos`, `retrieval_query_videos`):
    top-k over a gallery of 30 and one of 9,000 are different measures."""
    gallery = video_features(model, train_loader, device, pool)
    query = video_features(model, test_loader, device, pool)
    return retrieval_scores(gallery, query, ks)


def retrieval_scores(gallery: Features, query: Features, ks: Sequence[int] = TOP_K) -> dict[str, float]:
    """`topk_hits` of features already extracted, with the number of videos on each side."""
    hits = topk_hits(query[0], query[1], gallery[0], gallery[1], ks)
    return {**hits, "retrieval_gallery_videos": float(len(gallery[0])), "retrieval_query_videos": float(len(query[0]))}


def split_features(model: nn.Module, cfg, splits, device: torch.device | str, test_loader=None) -> tuple[Features, Features]:
    """The video features of a run's whole training list (every video of it, as upstream, whatever
    the run's fraction and hold-out) and of its test videos, clips cut as `cfg.clip` says, pooled
    as `cfg.pcl.retrieval_pool`; `test_loader` reuses a loader of the test videos."""
    from kdhar.data.dataset import VideoClipDataset, make_loader

    def loader(index):
        ds = VideoClipDataset(index, cfg.clip, train=False, on_bad=cfg.data.on_bad)
        return make_loader(ds, cfg.optim.batch_size, shuffle=False, num_workers=cfg.data.num_workers)

    pool = cfg.pcl.retrieval_pool
    train = video_features(model, loader(splits.train_list), device, pool)
    return train, video_features(model, test_loader or loader(splits.test), device, pool)


def retrieval_on_splits(model: nn.Module, cfg, splits, device: torch.device | str, test_loader=None) -> dict[str, float]:
    """`retrieval` of a run's test videos against its whole training list (`split_features`)."""
    return retrieval_scores(*split_features(model, cfg, splits, device, test_loader))


__all__ = ["TOP_K", "Features", "clip_feature", "video_features", "topk_hits", "retrieval", "retrieval_scores",
           "split_features", "retrieval_on_splits"]
