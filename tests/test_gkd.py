"""GKD's building blocks against ../shared/methods/gkd.md (sections 2.1-2.5): shapes, the CVAE loss and
its conditional prior, generation from the attention, the rescale, and adapters for every pair."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kdhar.models import MODELS, build_model
from kdhar.objectives.gkd import CVAE, AttentionHead, FeatureAdapter, _groups, attend, cvae_loss, feature_shape

SHAPE = (2, 64, 4, 7, 7)  # (B, C, T', H', W'): a width-8 ResNet's last stage on 32-frame 112x112 clips


@pytest.mark.parametrize("variant", ["faithful", "light"])
def test_attention_is_channel_by_time_in_zero_one_and_the_cvae_regenerates_the_feature_shape(variant):
    torch.manual_seed(0)
    b, c, t, h, w = SHAPE
    feature = torch.rand(SHAPE)
    head = AttentionHead(c, t, (h, w), variant)
    a = head(feature)
    assert a.shape == (b, c, t) and bool(((a > 0) & (a < 1)).all())
    cvae = CVAE(c, t, (h, w), variant)
    mu, logvar, z, regenerated = cvae(feature, a)
    assert mu.shape == logvar.shape == z.shape == (b, t, c)
    assert regenerated.shape == SHAPE and bool((regenerated >= 0).all())  # ReLU, like the trunk's features
    assert cvae.inference(a).shape == SHAPE
    faithful_params = sum(p.numel() for p in AttentionHead(c, t, (h, w), "faithful").parameters())
    if variant == "light":
        assert sum(p.numel() for p in head.parameters()) < faithful_params / 4  # no (1, H', W') kernels


def test_cvae_loss_is_recon_plus_a_tenth_of_the_kl_to_the_attention_not_to_zero():
    g = torch.Generator().manual_seed(1)
    feature, regenerated = torch.rand(2, 3, 4, 2, 2, generator=g), torch.rand(2, 3, 4, 2, 2, generator=g)
    mu, logvar = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    attention = torch.rand(2, 3, 4, generator=g)
    out = cvae_loss(feature, regenerated, mu, logvar, attention)
    # Independently, in numpy: KL(N(mu, s^2) || N(a, 1)) per element = 1/2 (s^2 + (mu - a)^2 - 1 - log s^2).
    m, lv, a = mu.numpy(), logvar.numpy(), attention.numpy().transpose(0, 2, 1)
    kl = np.mean(0.5 * (np.exp(lv) + (m - a) ** 2 - 1 - lv))
    recon = np.mean((feature.numpy() - regenerated.numpy()) ** 2)
    assert out["kl_loss"].item() == pytest.approx(kl, rel=1e-5)
    assert out["loss"].item() == pytest.approx(recon + 0.1 * kl, rel=1e-5)
    standard_prior = np.mean(0.5 * (np.exp(lv) + m ** 2 - 1 - lv))
    assert abs(out["kl_loss"].item() - standard_prior) > 0.1  # N(0, I) would be another loss


def test_generation_from_the_attention_samples_the_prior_around_it():
    torch.manual_seed(2)
    b, c, t, h, w = SHAPE
    cvae = CVAE(c, t, (h, w), "light").eval()
    a = torch.rand(b, c, t)
    zero = torch.zeros(b, t, c)
    # With the noise at zero, generation decodes z = A_t exactly.
    assert torch.allclose(cvae.inference(a, noise=zero), cvae.decode(a.transpose(1, 2), a))
    feature = torch.rand(SHAPE)
    mu, logvar, z, _ = cvae(feature, a, noise=zero)
    assert torch.equal(z, mu)  # reparameterisation: z = mu + eps * sigma


def test_attended_feature_keeps_the_activation_mass_per_sample_or_over_the_batch():
    torch.manual_seed(3)
    feature, attention = torch.rand(SHAPE), torch.rand(SHAPE[:3])
    per_sample = attend(feature, attention)
    assert torch.allclose(per_sample.sum(dim=(1, 2, 3, 4)), feature.sum(dim=(1, 2, 3, 4)))
    # Per sample, a sample's result does not depend on the rest of its batch; the code's batch-global form does.
    assert torch.allclose(attend(feature[:1], attention[:1]), per_sample[:1])
    batch = attend(feature, attention, "batch")
    assert torch.allclose(batch.sum(), feature.sum())
    assert not torch.allclose(attend(feature[:1], attention[:1], "batch"), batch[:1])
    with pytest.raises(ValueError, match="rescale 'global'"):
        attend(feature, attention, "global")


def test_adapters_give_the_teachers_shape_for_every_registry_pair():
    torch.manual_seed(4)
    shapes = {name: feature_shape(build_model(name, 10, width=8).eval(), 8, 56) for name in MODELS}
    for student, teacher in itertools.permutations(MODELS, 2):
        adapter = FeatureAdapter(shapes[student], shapes[teacher])
        x = torch.rand(2, *shapes[student])
        assert tuple(adapter(x).shape[1:]) == shapes[teacher], (student, teacher)
        assert adapter.needed == (shapes[student] != shapes[teacher])
    same = FeatureAdapter(shapes["r3d_18"], shapes["r3d_18"])
    assert not same.needed and same.describe() == "none" and not list(same.parameters())
    # At the CPU size (8-frame 56x56 clips, width 8): tiny3d's last map is (32, 2, 7, 7), C3D's (64, 1, 4, 4).
    assert FeatureAdapter(shapes["tiny3d"], shapes["c3d"]).describe() == "1x1x1 conv 32->64, resize 2x7x7->1x4x4"


# The grid's last-stage widths (C of width-4/8 trunks) and the T' a clip can leave them.
GRID_WIDTHS, GRID_TIMES = (16, 32, 64), (1, 2, 4, 8)


@pytest.mark.parametrize("variant", ["faithful", "light"])
@pytest.mark.parametrize("c,t", list(itertools.product(GRID_WIDTHS, GRID_TIMES)))
def test_the_attention_and_the_cvae_encoder_depend_on_the_clip_at_every_grid_width_and_time(variant, c, t):
    torch.manual_seed(3)
    space = (2, 2)
    a_clip, b_clip = torch.rand(1, c, t, *space), torch.rand(1, c, t, *space)
    head = AttentionHead(c, t, space, variant)
    a, b = head(a_clip), head(b_clip)
    assert (a - b).abs().max().item() > 1e-3, "two clips got the same attention"
    assert a.std().item() > 1e-3  # not one value for every channel either
    cvae = CVAE(c, t, space, variant)
    mu_a, _ = cvae.encode(a_clip, a)
    mu_b, _ = cvae.encode(b_clip, a)  # the same attention: only the feature differs
    assert (mu_a - mu_b).abs().max().item() > 1e-4, "the CVAE encoder ignores the feature"


def test_the_old_group_rule_made_the_attention_a_constant_at_t_one():
    # One channel per group and T' = 1: each group normalises one value, so the attention is the
    # GroupNorm's bias whatever the clip (kept as norm="channels" to show and flag it).
    torch.manual_seed(4)
    head = AttentionHead(32, 1, (2, 2), "faithful", norm="channels")
    a, b = head(torch.rand(2, 32, 1, 2, 2)), head(torch.rand(2, 32, 1, 2, 2))
    # Equal up to rounding (x - mean of one value is not exactly 0 in float32).
    assert (a - b).abs().max().item() < 1e-4 and (a[0] - a[1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("channels,values", [(512, 8), (1024, 8), (1024, 8 * 7 * 7)])
def test_both_group_rules_keep_the_codes_32_groups_at_the_i3d_shape(channels, values):
    assert _groups(channels, values, "values") == _groups(channels, values, "channels") == 32


def test_groups_hold_at_least_sixteen_values_where_the_channels_allow_it():
    assert _groups(32, 1) == 2 and _groups(64, 2) == 8 and _groups(16, 4) == 4
    assert _groups(8, 1) == 1  # fewer values than the minimum in all: one group of all channels
