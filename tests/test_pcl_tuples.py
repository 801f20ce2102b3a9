"""PCL tuple sampling and pretext transforms against ../shared/methods/pcl.md (sections 1.4 and 2)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from kdhar.data.tuples import REMOTE_GAP, TupleLayout, clip_indices, draw_tuple, remote_start
from kdhar.data.pretext import draw_swap, permute_quadrants, rotate, swap_chunks, transform


def test_layouts_follow_upstream_and_the_nominal_reading():
    upstream, nominal = TupleLayout(), TupleLayout(stride="nominal")
    assert upstream.span == nominal.span == 46  # 10*3 + 8*2: VCOP's minimum length at 10_8_3
    assert upstream.starts(5) == [5, 16, 27]  # 11 apart: tuple length + interval, a 1-frame gap
    assert nominal.starts(5) == [5, 23, 41]  # 18 apart: clip length + interval
    assert TupleLayout(clip_len=16).starts(0) == [0, 11, 22]  # at 16 frames upstream's clips overlap
    assert TupleLayout(clip_len=16).span == 64
    assert not upstream.fits(45) and upstream.fits(46)
    with pytest.raises(ValueError, match="clip_stride 'sideways'"):
        TupleLayout(stride="sideways")
    with pytest.raises(ValueError, match="clip_len 6: torch.chunk splits it into 3"):
        TupleLayout(clip_len=6)


@pytest.mark.parametrize(("title", "layout"), [
    ("paper size: clip_len 10, interval 8 (a video needs 46 frames)", TupleLayout(clip_len=10, interval=8)),
    ("size cpu: clip_len 8, interval 2 (a video needs 28 frames)", TupleLayout(clip_len=8, interval=2)),
])
def test_the_readmes_tuple_diagrams_are_the_codes(title, layout):
    from pathlib import Path

    from kdhar.data.tuples import diagram

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = "\n".join("    " + line for line in [title, *diagram(layout).splitlines()])
    assert shown in readme
    assert f"needs {layout.span} frames" in title


def test_draws_stay_in_the_video_and_remote_clips_keep_their_distance():
    layout, rng = TupleLayout(), np.random.default_rng(0)
    labels = Counter()
    for n in (46, 60, 97, 98, 150, 300):
        for _ in range(400):
            d = draw_tuple(rng, n, layout)
            labels[(n, d.label)] += 1
            idx = clip_indices(d, layout)
            assert idx.shape == (4, 10) and idx.min() >= 0 and idx.max() < n
            assert 0 <= d.start <= n - layout.span
            if d.label == 4:
                tuple_end = d.start + layout.span
                assert d.remote + layout.clip_len + REMOTE_GAP <= d.start or d.remote >= tuple_end + REMOTE_GAP
            else:
                assert d.remote is None and (idx[3] == idx[1]).all()  # the 4th clip copies the middle one
    # A remote clip needs 10 + 16 frames on both sides of the tuple: below 98 frames label 4 never occurs.
    assert all(labels[(n, 4)] == 0 for n in (46, 60, 97))
    assert labels[(300, 4)] > 0
    assert remote_start(rng, 97, 26, layout) is None
    with pytest.raises(ValueError, match="shorter than a tuple"):
        draw_tuple(rng, 45, layout)


def test_transforms_match_the_spec():
    clip = torch.arange(3 * 10 * 4 * 4, dtype=torch.float32).reshape(3, 10, 4, 4)
    assert torch.equal(rotate(clip, 1)[0, 0], torch.rot90(clip[0, 0], 1))
    # Quadrants A B / C D become D C / B A.
    quads = permute_quadrants(clip, (3, 2, 1, 0))
    assert torch.equal(quads[..., :2, :2], clip[..., 2:, 2:]) and torch.equal(quads[..., 2:, 2:], clip[..., :2, :2])
    assert torch.equal(quads[..., :2, 2:], clip[..., 2:, :2]) and torch.equal(quads[..., 2:, :2], clip[..., :2, 2:])
    # torch.chunk splits 10 frames 3/3/3/1; swapping chunks 0 and 3 gives frames 9, 3-8, 0-2.
    swapped = swap_chunks(clip, 0, 3)
    assert torch.equal(swapped, clip[:, [9, 3, 4, 5, 6, 7, 8, 0, 1, 2]])
    rng = np.random.default_rng(0)
    assert torch.equal(transform(clip, 0, rng), clip) and torch.equal(transform(clip, 4, rng), clip)
    for label in (1, 2, 3):
        assert not torch.equal(transform(clip, label, rng), clip)
    assert not torch.equal(transform(clip, 2, rng, spatial_perm="random"), clip)


def test_swap_pairs_are_uniform_over_all_six_or_the_three_neighbours():
    rng = np.random.default_rng(1)
    any_pairs = Counter(tuple(sorted(draw_swap(rng, "any"))) for _ in range(6000))
    assert set(any_pairs) == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}
    assert all(abs(c / 6000 - 1 / 6) < 0.02 for c in any_pairs.values())
    adjacent = Counter(draw_swap(rng, "adjacent") for _ in range(3000))
    assert set(adjacent) == {(0, 1), (1, 2), (2, 3)}


def test_tuple_dataset_on_real_videos(tmp_path):
    from kdhar.config import ClipConfig
    from kdhar.data.index import DatasetIndex, VideoSample
    from kdhar.data.tuples import TupleClipDataset
    from kdhar.data.video import write_video

    def frames(n: int, seed: int) -> np.ndarray:
        texture = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        return np.stack([np.roll(texture, 2 * t, axis=1) for t in range(n)])

    lengths = {"long0": 120, "long1": 100, "short": 30}
    samples = []
    for k, (name, n) in enumerate(lengths.items()):
        path = tmp_path / f"c{k % 2}" / f"{name}.avi"
        write_video(path, frames(n, seed=k))
        samples.append(VideoSample(path, k % 2, name))
    index = DatasetIndex(samples=samples, classes=["c0", "c1"], root=tmp_path)
    clip = ClipConfig(resize=(40, 53), crop=32, augment=True, hflip=True)
    layout = TupleLayout(clip_len=8, interval=2, tuple_len=3)  # span 28: the 30-frame video fits
    train = TupleClipDataset(index, clip, TupleLayout(clip_len=10, interval=8), train=True, seed=0)
    assert len(train) == 2 and train.too_short == 1  # 30 frames < 46: left out and counted

    ds = TupleClipDataset(index, clip, layout, train=True, seed=0)
    assert len(ds) == 3 and ds.too_short == 0
    item = ds[(0, 0)]
    assert item["clips"].shape == (3, 3, 8, 32, 32) and item["clips"].dtype == torch.float32
    assert 0 <= item["pretext"] <= 4 and item["label"] == 0 and item["index"] == 0
    assert torch.equal(ds[(0, 0)]["clips"], item["clips"])  # one (item, view) always gives the same tuple
    labels = {ds[(i, v)]["pretext"] for i in range(3) for v in range(40)}
    assert labels == {0, 1, 2, 3, 4}
    # Validation tuples are fixed per video, whatever the epoch.
    val = TupleClipDataset(index, clip, layout, train=False, seed=0)
    val.set_epoch(0)
    first = val[1]
    val.set_epoch(5)
    assert torch.equal(val[1]["clips"], first["clips"]) and val[1]["pretext"] == first["pretext"]


def test_memory_bank_nce_scores_across_views_and_moves_the_banks():
    import torch.nn.functional as F

    from kdhar.objectives.contrast import MemoryBankNCE, Projector, nt_xent

    torch.manual_seed(0)
    proj = Projector(16)
    z = proj(torch.randn(4, 16))
    assert z.shape == (4, 128) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)

    nce = MemoryBankNCE(num_rows=50, dim=8, negatives=6)
    z0, z2 = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    index = torch.tensor([4, 7, 9])
    bank0, bank2 = nce.bank0.clone(), nce.bank2.clone()
    gen = torch.Generator().manual_seed(3)
    out = nce(z0, z2, index, generator=gen)
    # The same draw by hand: z0 against M2, z2 against M0, positive (the sample's own row) at 0.
    draw = torch.randint(50, (3, 7), generator=torch.Generator().manual_seed(3))
    draw[:, 0] = index
    by_hand0 = F.cross_entropy((bank2[draw] @ z0.unsqueeze(2)).squeeze(2) / 0.07, torch.zeros(3, dtype=torch.long))
    by_hand2 = F.cross_entropy((bank0[draw] @ z2.unsqueeze(2)).squeeze(2) / 0.07, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(out["nce0_loss"], by_hand0) and torch.allclose(out["nce2_loss"], by_hand2)
    assert torch.allclose(nce.bank0[index], F.normalize(0.5 * bank0[index] + 0.5 * z0, dim=1))
    assert torch.equal(nce.bank0[0], bank0[0])  # rows of other videos stay put
    assert {"bank0", "bank2"} <= set(nce.state_dict())  # saved in a run's checkpoint, so a resume keeps them

    small = MemoryBankNCE(num_rows=3, dim=8, negatives=1024)  # rows repeat within a draw
    assert torch.isfinite(small(z0, z2, torch.tensor([0, 1, 2]))["nce0_loss"])

    # In-batch NT-Xent is low when the two views agree and high when they do not.
    assert nt_xent(z0, z0, 0.1) < nt_xent(z0, z0.flip(0), 0.1)


def test_pretext_labels_are_uniform_where_videos_are_long_enough():
    # At 2000 frames the remote clip fits for all but ~3 % of tuple starts, so label 4 is redrawn rarely.
    layout, rng = TupleLayout(), np.random.default_rng(1)
    counts = Counter(draw_tuple(rng, 2000, layout).label for _ in range(10000))
    assert set(counts) == {0, 1, 2, 3, 4}
    assert all(abs(counts[k] / 10000 - 0.2) < 0.02 for k in range(5)), counts
