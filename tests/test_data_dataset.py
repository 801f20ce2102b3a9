"""VideoClipDataset and make_loader on small real encoded videos, with 0 and 2 workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdhar.config import ClipConfig
from kdhar.data.dataset import ReplayLoader, VideoClipDataset, make_loader
from kdhar.data.index import DatasetIndex, VideoSample
from kdhar.data.video import VideoError, write_video

CLIP = ClipConfig(clip_len=4, frame_interval=2, test_clips=3, resize=(32, 40), crop=24)
# A hung worker must fail the test, not the whole CI job.
LOADER_TIMEOUT_S = 60


def moving_frames(n: int, seed: int) -> np.ndarray:
    texture = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    return np.stack([np.roll(texture, 2 * t, axis=1) for t in range(n)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    paths = {}
    for k in range(6):
        paths[f"ok{k}"] = root / f"c{k % 2}" / f"ok{k}.avi"
        write_video(paths[f"ok{k}"], moving_frames(24, seed=k))
    paths["short"] = root / "c0" / "short.avi"
    write_video(paths["short"], moving_frames(3, seed=9))  # shorter than one clip (7 frames)
    paths["empty"] = root / "c1" / "empty.avi"
    paths["empty"].write_bytes(b"")
    paths["garbage"] = root / "c1" / "garbage.avi"
    paths["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    data = paths["ok0"].read_bytes()
    paths["truncated"] = root / "c0" / "truncated.avi"
    paths["truncated"].write_bytes(data[: len(data) // 3])
    paths["bad_codec"] = root / "c0" / "bad_codec.avi"
    paths["bad_codec"].write_bytes(data.replace(b"FMP4", b"ZZZZ"))
    # Header and index intact, compressed frames overwritten: opens, then fails on read.
    corrupt = bytearray(data)
    corrupt[4000 : len(data) - 2000 : 7] = b"\xff" * len(range(4000, len(data) - 2000, 7))
    paths["corrupt"] = root / "c1" / "corrupt.avi"
    paths["corrupt"].write_bytes(bytes(corrupt))
    return paths


def make_index(paths: list[Path]) -> DatasetIndex:
    samples = [VideoSample(p, int(p.parent.name[1]), p.stem) for p in paths]
    return DatasetIndex(samples=samples, classes=["c0", "c1"], root=paths[0].parent.parent)


def good(videos: dict[str, Path]) -> list[Path]:
    return [videos[f"ok{k}"] for k in range(6)]


def test_training_items_are_deterministic_per_index_and_view(videos: dict[str, Path]) -> None:
    ds = VideoClipDataset(make_index(good(videos)), CLIP, train=True, seed=1)
    item = ds[2]
    assert item["clip"].shape == (3, 4, 24, 24) and item["clip"].dtype == torch.float32
    assert (item["label"], item["index"], item["view"]) == (0, 2, 0)
    torch.testing.assert_close(ds[2]["clip"], item["clip"], rtol=0, atol=0)
    ds.set_epoch(1)
    assert ds[2]["view"] == 1
    assert not torch.equal(ds[2]["clip"], item["clip"])
    torch.testing.assert_close(ds[(2, 0)]["clip"], item["clip"], rtol=0, atol=0)
    other_seed = VideoClipDataset(make_index(good(videos)), CLIP, train=True, seed=2)
    assert not torch.equal(other_seed[2]["clip"], item["clip"])


def test_num_views_cycles(videos: dict[str, Path]) -> None:
    ds = VideoClipDataset(make_index(good(videos)), CLIP, train=True, num_views=2)
    first = ds[0]["clip"]
    ds.set_epoch(2)
    assert ds[0]["view"] == 0
    torch.testing.assert_close(ds[0]["clip"], first, rtol=0, atol=0)


def test_eval_items_one_per_video_and_clip(videos: dict[str, Path]) -> None:
    ds = VideoClipDataset(make_index(good(videos)[:2]), CLIP, train=False)
    assert len(ds) == 2 * 3
    items = [ds[i] for i in range(len(ds))]
    assert [(it["index"], it["clip_index"]) for it in items] == [(v, k) for v in range(2) for k in range(3)]
    assert [it["label"] for it in items] == [0, 0, 0, 1, 1, 1]
    # Evenly spaced clips differ; no augmentation, so a second read is identical.
    assert not torch.equal(items[0]["clip"], items[2]["clip"])
    torch.testing.assert_close(ds[1]["clip"], items[1]["clip"], rtol=0, atol=0)


def test_short_video_gives_a_full_clip_under_both_policies(videos: dict[str, Path]) -> None:
    for on_bad in ("error", "skip"):
        ds = VideoClipDataset(make_index([videos["short"]]), CLIP, train=True, on_bad=on_bad)
        clip = ds[0]["clip"]
        assert clip.shape == (3, 4, 24, 24)
        torch.testing.assert_close(clip[:, 2], clip[:, 3])  # frames 4 and 6 both clamp to frame 2


BAD = ["empty", "garbage", "truncated", "bad_codec", "corrupt"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_video_policies(videos: dict[str, Path], kind: str) -> None:
    index = make_index([videos[kind]])
    if kind == "truncated":
        # A truncated file that still decodes is usable: its clip is clamped to the frames it has.
        assert VideoClipDataset(index, CLIP, train=True)[0]["clip"].shape == (3, 4, 24, 24)
        return
    with pytest.raises(VideoError, match=f"{kind}.avi"):
        VideoClipDataset(index, CLIP, train=True)[0]
    assert VideoClipDataset(index, CLIP, train=False, on_bad="skip")[0] is None


def test_loader_with_two_workers_set_epoch_and_skips(videos: dict[str, Path]) -> None:
    paths = good(videos) + [videos["garbage"], videos["empty"]]
    ds = VideoClipDataset(make_index(paths), CLIP, train=True, seed=5, on_bad="skip")
    loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=2, seed=5, timeout=LOADER_TIMEOUT_S)
    assert loader.persistent_workers
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 2  # 8 items, drop_last
        assert sum(b["skipped"] for b in batches) == 2
        assert sum(len(b["label"]) for b in batches) == 6
        epochs.append({int(i): clip for b in batches for i, clip in zip(b["index"], b["clip"])})
        assert all(int(v) == epoch for b in batches for v in b["view"])
    # The persistent workers saw the new epoch: each clip is the main process's view for it.
    for epoch, clips in enumerate(epochs):
        ds.set_epoch(epoch)
        for i, clip in clips.items():
            torch.testing.assert_close(clip, ds[i]["clip"], rtol=0, atol=0)
    assert not torch.equal(epochs[0][0], epochs[1][0])


def test_loader_eval_order_and_error_from_worker(videos: dict[str, Path]) -> None:
    ds = VideoClipDataset(make_index(good(videos)[:2]), CLIP, train=False)
    batches = list(make_loader(ds, batch_size=4, shuffle=False, num_workers=0))
    assert [len(b["index"]) for b in batches] == [4, 2]  # eval keeps the last partial batch
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 0, 0, 1, 1, 1]

    bad = VideoClipDataset(make_index(good(videos)[:2] + [videos["bad_codec"]]), CLIP, train=False)
    loader = make_loader(bad, batch_size=3, shuffle=False, num_workers=2, timeout=LOADER_TIMEOUT_S)
    with pytest.raises(VideoError, match="bad_codec.avi"):
        list(loader)


def test_frame_cache_gives_the_same_items_and_respects_its_budget(videos: dict[str, Path]) -> None:
    paths = good(videos)[:3]
    plain = VideoClipDataset(make_index(paths), CLIP, train=True, seed=5)
    cached = CountingDataset(make_index(paths), CLIP, train=True, seed=5, cache_bytes=2**30)
    for view in (0, 1, 2):
        for item in range(3):
            a, b = plain[(item, view)], cached[(item, view)]
            assert torch.equal(a["clip"], b["clip"]) and a["label"] == b["label"]
    assert len(cached._frames) == 3
    evaluation = VideoClipDataset(make_index(paths), CLIP, train=False, cache_bytes=2**30)
    reference = VideoClipDataset(make_index(paths), CLIP, train=False)
    assert all(torch.equal(evaluation[i]["clip"], reference[i]["clip"]) for i in range(len(reference)))

    one_video = next(iter(cached._frames.values())).nbytes
    small = VideoClipDataset(make_index(paths), CLIP, train=True, seed=5, cache_bytes=one_video)
    for item in range(3):
        assert torch.equal(small[(item, 0)]["clip"], plain[(item, 0)]["clip"])
    assert len(small._frames) == 1 and small._cached_bytes <= one_video


class CountingDataset(VideoClipDataset):
    """Counts decodes, to show which passes read the videos."""

    reads = 0

    def _load(self, item: int, view: int):
        CountingDataset.reads += 1
        return super()._load(item, view)


def test_replay_loader_decodes_an_evaluation_set_once_and_replays_it_exactly(videos: dict[str, Path]) -> None:
    ds = CountingDataset(make_index(good(videos)[:2]), CLIP, train=False)
    replay = ReplayLoader(make_loader(ds, batch_size=4, shuffle=False, num_workers=0), max_bytes=2**30)
    CountingDataset.reads = 0
    first, second = list(replay), list(replay)
    assert CountingDataset.reads == 6 and len(replay) == 2
    assert [torch.equal(a["clip"], b["clip"]) and torch.equal(a["index"], b["index"]) for a, b in zip(first, second)] == [True, True]

    # A set that does not fit is decoded on every pass, as without the wrapper.
    small = ReplayLoader(make_loader(ds, batch_size=4, shuffle=False, num_workers=0), max_bytes=first[0]["clip"].nbytes)
    CountingDataset.reads = 0
    assert [len(b["index"]) for b in small] == [4, 2] and [len(b["index"]) for b in small] == [4, 2]
    assert CountingDataset.reads == 12 and small.batches is None

    # A pass broken off half way is not kept.
    partial = ReplayLoader(make_loader(ds, batch_size=4, shuffle=False, num_workers=0), max_bytes=2**30)
    next(iter(partial))
    assert partial.batches is None


def test_batch_of_only_bad_videos(videos: dict[str, Path]) -> None:
    ds = VideoClipDataset(make_index([videos["empty"], videos["garbage"]]), CLIP, train=True, on_bad="skip")
    (batch,) = list(make_loader(ds, batch_size=2, shuffle=False, num_workers=0))
    assert batch["skipped"] == 2 and batch["clip"].numel() == 0 and len(batch["label"]) == 0


def test_invalid_policy(videos: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="on_bad"):
        VideoClipDataset(make_index(good(videos)), CLIP, train=True, on_bad="ignore")
