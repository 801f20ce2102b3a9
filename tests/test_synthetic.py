"""The synthetic action-video generator: official split formats, decodable videos, classes that
differ only in motion over time, group styles, difficulty and determinism."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import decord
import numpy as np
import pytest

from kdhar.data.synthetic import (
    CATALOGUE,
    HMDB_SPLIT_DIR,
    MARKER,
    SynthError,
    SynthSpec,
    class_names,
    generate,
    group_style,
    motion,
    render_clip,
)

SHARED_UCF = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucf101"

# 25 groups so the official split rule (test = g01-g07, g08-g14, g15-g21) is checked as is.
UCF_SPEC = SynthSpec(num_classes=2, groups=25, clips_per_group=1, frames=4, size=(32, 32), seed=3)
HMDB_SPEC = SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=12, size=(48, 64), seed=3)
CLIP_SPEC = SynthSpec(frames=12, size=(48, 64))

# The official files' line shapes (one class folder is spelt differently from its videos there).
CLASS_LINE = re.compile(r"^(\d+) ([A-Za-z]+)$")
TRAIN_LINE = re.compile(r"^([A-Za-z]+)/v_([A-Za-z]+)_g(\d\d)_c(\d\d)\.avi (\d+)$")
TEST_LINE = re.compile(r"^([A-Za-z]+)/v_([A-Za-z]+)_g(\d\d)_c(\d\d)\.avi$")
HMDB_LINE = re.compile(r"^([a-z_]+)_g(\d\d)_c(\d\d)\.avi ([012])$")


def crlf_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\r\n"), f"{path}: last line lacks CRLF"
    assert b"\n" not in data.replace(b"\r\n", b""), f"{path}: a line ends in a bare LF"
    return data.decode("ascii").split("\r\n")[:-1]


def parse_ucf(root: Path, split: int) -> tuple[dict[str, int], list[tuple], list[tuple]]:
    classes = {}
    for line in crlf_lines(root / "classInd.txt"):
        number, name = CLASS_LINE.fullmatch(line).groups()
        classes[name] = int(number)
    train = [TRAIN_LINE.fullmatch(line).groups() for line in crlf_lines(root / f"trainlist{split:02d}.txt")]
    test = [TEST_LINE.fullmatch(line).groups() for line in crlf_lines(root / f"testlist{split:02d}.txt")]
    return classes, train, test


@pytest.fixture(scope="module")
def ucf_set(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("synth") / "ucf101", "ucf101", UCF_SPEC)


@pytest.fixture(scope="module")
def hmdb_set(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("synth") / "hmdb51", "hmdb51", HMDB_SPEC)


def test_ucf_split_files_follow_the_official_format_and_group_rule(ucf_set):
    root = ucf_set.root
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.avi")}
    assert len(on_disk) == ucf_set.num_videos == 2 * 25
    official_test = {1: set(range(1, 8)), 2: set(range(8, 15)), 3: set(range(15, 22))}
    for split in (1, 2, 3):
        classes, train, test = parse_ucf(root, split)
        assert classes == {name: i for i, name in enumerate(ucf_set.classes, 1)}  # 1-based, label order
        for folder, cls, *_, label in train:
            assert folder == cls and classes[cls] == int(label)
        train_groups = {int(g) for *_, g, _, _ in train}
        test_groups = {int(g) for *_, g, _ in test}
        assert test_groups == official_test[split]
        assert train_groups == set(range(1, 26)) - official_test[split]
        listed = {f"{c}/v_{c}_g{g}_c{k}.avi" for c, _, g, k, _ in train} | {f"{c}/v_{c}_g{g}_c{k}.avi" for c, _, g, k in test}
        assert listed == on_disk


def test_official_ucf_files_have_the_shapes_the_generator_writes():
    if not SHARED_UCF.is_dir():
        pytest.skip(f"{SHARED_UCF} absent")
    classes, train, test = parse_ucf(SHARED_UCF, 1)
    assert len(classes) == 101 and sorted(classes.values()) == list(range(1, 102))
    assert {int(g) for *_, g, _ in test} == set(range(1, 8))
    assert {int(g) for *_, g, _, _ in train} == set(range(8, 26))


def test_videos_decode_with_decord_to_the_spec(ucf_set, hmdb_set):
    for ds, spec in ((ucf_set, UCF_SPEC), (hmdb_set, HMDB_SPEC)):
        for path in sorted(ds.root.rglob("*.avi"))[:3]:
            reader = decord.VideoReader(str(path))
            assert len(reader) == spec.frames
            frames = reader.get_batch(list(range(spec.frames))).asnumpy()
            assert frames.shape == (spec.frames, *spec.size, 3)
            assert frames.std() > 5  # real content, not a blank frame


def test_hmdb_split_files_split_about_70_30_by_group(hmdb_set):
    root = hmdb_set.root
    assert hmdb_set.classes == sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != HMDB_SPLIT_DIR)
    test_groups_per_split = []
    for split in (1, 2, 3):
        per_class = []
        for cls in hmdb_set.classes:
            text = (root / HMDB_SPLIT_DIR / f"{cls}_test_split{split}.txt").read_text(encoding="ascii")
            rows = [HMDB_LINE.fullmatch(line).groups() for line in text.splitlines()]
            assert {f"{c}_g{g}_c{k}.avi" for c, g, k, _ in rows} == {p.name for p in (root / cls).glob("*.avi")}
            tags = {}
            for c, g, _, tag in rows:
                assert c == cls
                assert tags.setdefault(g, tag) == tag  # every clip of a group on the same side
            per_class.append(frozenset(g for g, tag in tags.items() if tag == "2"))
        assert len(set(per_class)) == 1  # the same groups are held out for every class
        assert len(per_class[0]) == 3  # 30 % of 10 groups
        test_groups_per_split.append(per_class[0])
    assert len(set(test_groups_per_split)) > 1


def test_layouts_use_different_class_sets():
    assert len(CATALOGUE) >= 20
    ucf, hmdb = class_names("ucf101", 10), class_names("hmdb51", 10)
    assert all(re.fullmatch(r"(?:[A-Z][a-z]+)+", n) for n in ucf)
    assert all(re.fullmatch(r"[a-z]+(?:_[a-z]+)*", n) for n in hmdb)
    ucf_motions, hmdb_motions = {motion(n).name for n in ucf}, {motion(n).name for n in hmdb}
    assert ucf_motions != hmdb_motions and not set(ucf) & set(hmdb)
    for names in (ucf, hmdb):  # every kind of temporal contrast, each with its partner
        chosen = [motion(n) for n in names]
        assert {m.kind for m in chosen} == {"reversal", "direction", "speed", "order"}
        assert all(m.partner in {c.name for c in chosen} for m in chosen)


def test_reversal_pairs_are_the_same_frames_in_reverse_order():
    style = group_style(2, CLIP_SPEC)
    reversed_classes = [m for m in CATALOGUE if m.reverse_of is not None]
    assert {"StandUp", "Recede", "CloseHand"} <= {m.name for m in reversed_classes}
    for m in reversed_classes:
        forward = render_clip(m.reverse_of, style, np.random.default_rng(11), CLIP_SPEC)
        backward = render_clip(m.name, style, np.random.default_rng(11), CLIP_SPEC)
        assert np.array_equal(backward, forward[::-1]), m.name
        assert not np.array_equal(forward, forward[::-1]), f"{m.reverse_of} looks the same backwards"


def plain_style(spec: SynthSpec):
    """Group 1's figure on a flat, still, evenly lit, noiseless background."""
    style = group_style(1, spec)
    return dataclasses.replace(
        style, bg_color2=style.bg_color, noise=0.0, shake=0.0, flicker=0.0, light_slope=0.0, distractors=0
    )


def figure_track(class_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid x, y and area of the figure per frame."""
    spec = SynthSpec(frames=16, size=(96, 128), difficulty=0.0)
    frames = render_clip(class_name, plain_style(spec), np.random.default_rng(5), spec).astype(int)
    mask = np.abs(frames - frames[:, :1, :1]).max(axis=-1) > 30
    ys, xs = np.mgrid[0:96, 0:128]
    area = mask.sum(axis=(1, 2))
    return (xs * mask).sum(axis=(1, 2)) / area, (ys * mask).sum(axis=(1, 2)) / area, area


def test_motions_do_what_their_names_say():
    x, _, _ = figure_track("SlideLeft")
    assert x[-1] < x[0] - 10
    x, _, _ = figure_track("SlideRight")
    assert x[-1] > x[0] + 10
    _, y, _ = figure_track("SitDown")
    assert y[-1] > y[0] + 5  # image y grows downwards
    _, y, _ = figure_track("StandUp")
    assert y[-1] < y[0] - 5
    *_, area = figure_track("Approach")
    assert area[-1] > 1.5 * area[0]
    *_, area = figure_track("Recede")
    assert area[-1] < area[0] / 1.5
    # Order: which sub-motion dominates the first half.
    x, y, _ = figure_track("RightThenUp")
    assert x[8] - x[0] > 3 * abs(y[8] - y[0])
    x, y, _ = figure_track("UpThenRight")
    assert y[0] - y[8] > 3 * abs(x[8] - x[0])


def test_fast_classes_change_faster_than_slow_ones():
    spec = SynthSpec(frames=24, size=(96, 128), difficulty=0.0)

    def motion_energy(name: str) -> float:
        frames = render_clip(name, plain_style(spec), np.random.default_rng(2), spec)
        return float(np.abs(np.diff(frames.astype(np.int16), axis=0)).mean())

    for slow, fast in (("WaveSlow", "WaveFast"), ("BounceSlow", "BounceFast"), ("PulseSlow", "PulseFast")):
        assert motion_energy(fast) > 1.2 * motion_energy(slow), fast


def test_rendering_is_deterministic():
    style = group_style(1, CLIP_SPEC)
    a = render_clip("JumpThenSpin", style, np.random.default_rng(9), CLIP_SPEC)
    b = render_clip("JumpThenSpin", style, np.random.default_rng(9), CLIP_SPEC)
    c = render_clip("JumpThenSpin", style, np.random.default_rng(10), CLIP_SPEC)
    assert a.dtype == np.uint8 and a.shape == (12, 48, 64, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert group_style(1, CLIP_SPEC) == style
    assert group_style(1, dataclasses.replace(CLIP_SPEC, seed=1)) != style


def test_parallel_generation_writes_identical_files_and_reports_progress(hmdb_set, tmp_path):
    calls = []
    again = generate(tmp_path / "hmdb51", "hmdb51", HMDB_SPEC, workers=2, on_progress=lambda d, t: calls.append((d, t)))
    total = again.num_videos
    assert calls == [(i, total) for i in range(1, total + 1)]
    first = sorted(p.relative_to(hmdb_set.root) for p in hmdb_set.root.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    assert first == second and len(first) == total + 3 * 3 + 1  # videos, split files, marker
    for rel in first:
        assert (hmdb_set.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel


def test_groups_share_a_style_that_differs_across_groups():
    spec = dataclasses.replace(CLIP_SPEC, frames=4)
    names = class_names("ucf101", 3)
    means = {}
    for group in range(1, 5):
        style = group_style(group, spec)
        assert style == group_style(group, spec)
        for clip, name in enumerate(names):
            frames = render_clip(name, style, np.random.default_rng([group, clip]), spec)
            means[group, clip] = frames.reshape(-1, 3).mean(axis=0)
    keys = list(means)
    within = [np.linalg.norm(means[a] - means[b]) for a in keys for b in keys if a < b and a[0] == b[0]]
    across = [np.linalg.norm(means[a] - means[b]) for a in keys for b in keys if a[0] < b[0]]
    assert np.mean(within) < 0.3 * np.mean(across)
    assert len({group_style(g, spec) for g in range(1, 26)}) == 25
    assert group_style(1, spec, "hmdb51") != group_style(1, spec, "ucf101")


def test_difficulty_adds_clutter_noise_distractors_and_lowers_contrast():
    easy, hard = (dataclasses.replace(CLIP_SPEC, difficulty=d) for d in (0.1, 0.9))
    groups = range(1, 9)

    def contrast(s):
        mid = (np.asarray(s.bg_color) + np.asarray(s.bg_color2)) / 2
        return np.linalg.norm(np.asarray(s.actor_color) - mid)

    def clutter(s):
        return np.linalg.norm(np.asarray(s.bg_color) - np.asarray(s.bg_color2))

    e, h = [group_style(g, easy) for g in groups], [group_style(g, hard) for g in groups]
    assert np.mean([contrast(s) for s in h]) < 0.6 * np.mean([contrast(s) for s in e])
    assert np.mean([clutter(s) for s in h]) > 2 * np.mean([clutter(s) for s in e])
    assert np.mean([s.noise for s in h]) > 2 * np.mean([s.noise for s in e])
    assert sum(s.distractors for s in h) > sum(s.distractors for s in e)

    def roughness(spec):  # mean absolute difference between neighbouring pixels
        values = []
        for g in groups:
            frames = render_clip("WaveSlow", group_style(g, spec), np.random.default_rng(g), spec).astype(np.int16)
            values.append(np.abs(np.diff(frames, axis=2)).mean())
        return np.mean(values)

    assert roughness(hard) > 1.5 * roughness(easy)


def test_a_finished_set_is_kept_an_interrupted_one_resumed(tmp_path):
    spec = SynthSpec(num_classes=2, groups=3, clips_per_group=1, frames=4, size=(32, 32))
    root = generate(tmp_path / "set", "ucf101", spec).root
    video = root / "SitDown" / "v_SitDown_g02_c01.avi"
    original, stamp = video.read_bytes(), video.stat().st_mtime_ns
    assert generate(root, "ucf101", spec).num_videos == 6
    assert video.stat().st_mtime_ns == stamp  # nothing rewritten

    marker = json.loads((root / MARKER).read_text())
    (root / MARKER).write_text(json.dumps({**marker, "complete": False}))
    video.unlink()
    generate(root, "ucf101", spec)
    assert video.read_bytes() == original
    assert json.loads((root / MARKER).read_text())["complete"] is True

    harder = dataclasses.replace(spec, difficulty=0.9)
    with pytest.raises(SynthError, match="other settings"):
        generate(root, "ucf101", harder)
    generate(root, "ucf101", harder, overwrite=True)
    assert video.read_bytes() != original


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SynthSpec(num_classes=40), "num_classes=40"),
        (lambda: SynthSpec(size=(33, 64)), "size=.33, 64."),
        (lambda: SynthSpec(difficulty=1.5), "difficulty=1.5"),
        (lambda: SynthSpec(frames=1), "frames=1"),
        (lambda: render_clip("Dance", group_style(1, CLIP_SPEC), np.random.default_rng(0), CLIP_SPEC), "'Dance'"),
        (lambda: class_names("kinetics", 10), "layout='kinetics'"),
    ],
)
def test_mistakes_get_a_clear_error(make, message):
    with pytest.raises(SynthError, match=message):
        make()


def test_generate_refuses_unsuitable_folders_and_group_counts(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(SynthError, match="not empty"):
        generate(tmp_path / "busy", "ucf101", SynthSpec(num_classes=2, groups=3, frames=2, size=(16, 16)))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(SynthError, match="groups=2"):
        generate(tmp_path / "few", "ucf101", SynthSpec(num_classes=2, groups=2, frames=2, size=(16, 16)))



def test_two_writers_of_one_folder_both_finish_a_valid_set(tmp_path):
    """Two `generate` calls at once on one folder (two `kdhar data synth` commands) render the same
    videos at the same time; each writes under a temporary name of its own, so both finish and every
    video decodes. With one shared temporary name per video, a writer's rename found the file already
    moved by the other ("No such file or directory: .v_..._c02.tmp.avi")."""
    import threading

    from kdhar.data.check import check_dataset

    spec = SynthSpec(num_classes=3, groups=4, clips_per_group=3, frames=6, size=(32, 32))
    start, errors, done = threading.Barrier(2), [], []

    def writer() -> None:
        start.wait()
        try:
            done.append(generate(tmp_path / "set", "ucf101", spec).num_videos)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and done == [36, 36]
    root = tmp_path / "set"
    report = check_dataset(root, "ucf101", 1, workers=1)
    assert report.ok and sum(sum(c.values()) for c in report.counts.values()) == 36
    assert not [p for p in root.rglob(".*") if p.is_file()]  # no temporary file left behind
    assert json.loads((root / MARKER).read_text())["complete"] is True
