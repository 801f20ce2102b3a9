"""Clip augmentation: one draw per clip, the same on every frame, exactly replayable."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kdhar.data.transforms import ClipAugParams, apply_params, draw_params


def random_frames(t: int = 4, h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_identical_frames_stay_identical_under_every_augmentation() -> None:
    frame = random_frames(1)[0]
    clip = np.stack([frame] * 5)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        params = draw_params(rng, (60, 80), resize=(48, 64), crop=40)
        out = apply_params(clip, params)
        assert out.shape == (3, 5, 40, 40) and out.dtype == torch.float32
        for t in range(1, 5):
            torch.testing.assert_close(out[:, t], out[:, 0], rtol=0, atol=0)
        kinds = {
            "flip": params.flip,
            "jitter": params.brightness is not None,
            "gray": params.gray,
            "blur": params.blur_sigma is not None,
        }
        seen.update(kind for kind, drawn in kinds.items() if drawn)
    assert {"flip", "jitter", "gray", "blur"} <= seen  # the check above ran with every augmentation


def test_replay_from_params_is_exact() -> None:
    frames = random_frames()
    params = draw_params(np.random.default_rng(3), (60, 80), resize=(48, 64), crop=40)
    again = draw_params(np.random.default_rng(3), (60, 80), resize=(48, 64), crop=40)
    assert params == again
    rebuilt = ClipAugParams(**dataclasses.asdict(params))
    torch.testing.assert_close(apply_params(frames, params), apply_params(frames, rebuilt), rtol=0, atol=0)


def test_eval_view_is_resize_and_centre_crop() -> None:
    frames = random_frames()
    params = draw_params(None, (60, 80), resize=None, crop=40, augment=False)
    assert params == ClipAugParams(resize=(60, 80), crop=(10, 20, 40, 40))
    out = apply_params(frames, params)
    expected = torch.from_numpy(frames[:, 10:50, 20:60]).permute(3, 0, 1, 2).float() / 255 * 2 - 1
    torch.testing.assert_close(out, expected)


def test_crop_and_flip_select_the_right_pixels() -> None:
    frames = random_frames()
    params = ClipAugParams(resize=(60, 80), crop=(5, 7, 30, 30), flip=True)
    out = apply_params(frames, params)
    expected = torch.from_numpy(frames[:, 5:35, 7:37][:, :, ::-1].copy()).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(out, expected)


def test_gray_makes_channels_equal_and_blur_smooths() -> None:
    frames = random_frames()
    base = ClipAugParams(resize=(60, 80), crop=(0, 0, 40, 40))
    gray = apply_params(frames, dataclasses.replace(base, gray=True))
    torch.testing.assert_close(gray[0], gray[1])
    plain = apply_params(frames, base)
    blurred = apply_params(frames, dataclasses.replace(base, blur_sigma=1.5))
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * plain.diff(dim=-1).abs().mean()


def test_draw_rates_and_ranges_match_the_paper() -> None:
    rng = np.random.default_rng(0)
    draws = [draw_params(rng, (240, 320), resize=(128, 171), crop=112) for _ in range(4000)]
    rate = lambda pred: np.mean([pred(p) for p in draws])  # noqa: E731
    assert rate(lambda p: p.flip) == pytest.approx(0.5, abs=0.03)
    assert rate(lambda p: p.brightness is not None) == pytest.approx(0.8, abs=0.03)
    assert rate(lambda p: p.gray) == pytest.approx(0.2, abs=0.03)
    assert rate(lambda p: p.blur_sigma is not None) == pytest.approx(0.5, abs=0.03)
    jittered = [p for p in draws if p.brightness is not None]
    assert all(0.6 <= p.brightness <= 1.4 and 0.6 <= p.contrast <= 1.4 for p in jittered)
    assert all(0.6 <= p.saturation <= 1.4 and -0.1 <= p.hue <= 0.1 for p in jittered)
    assert all(0.1 <= p.blur_sigma <= 2.0 for p in draws if p.blur_sigma is not None)
    tops = [p.crop[0] for p in draws]
    lefts = [p.crop[1] for p in draws]
    assert min(tops) == 0 and max(tops) == 128 - 112 and min(lefts) == 0 and max(lefts) == 171 - 112
    assert all(p.resize == (128, 171) for p in draws)


def test_full_size_frames_are_resized_first() -> None:
    out = apply_params(random_frames(2, 240, 320), draw_params(np.random.default_rng(0), (240, 320)))
    assert out.shape == (3, 2, 112, 112)
    assert -1.0 <= out.min() and out.max() <= 1.0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        draw_params(np.random.default_rng(0), (60, 80), resize=(48, 64), crop=50)
    with pytest.raises(ValueError, match="uint8"):
        apply_params(np.zeros((2, 8, 8, 3), np.float32), ClipAugParams(resize=(8, 8), crop=(0, 0, 8, 8)))
