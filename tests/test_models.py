import pytest
import torch
import torchvision

from kdhar.models import MODELS, VideoClassifier, build_model, count_params, describe


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("clip_len,crop", [(10, 32), (16, 32), (8, 56)])
def test_logits_and_feature_map_shapes(name, clip_len, crop):
    model = build_model(name, num_classes=7, width=4).eval()
    x = torch.randn(1, 3, clip_len, crop, crop)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert isinstance(model, VideoClassifier)
    assert features.ndim == 5 and features.shape[:2] == (1, model.head.fc.in_features)
    assert all(s >= 1 for s in features.shape[2:])
    assert logits.shape == (1, 7)
    torch.testing.assert_close(model.head(features), logits)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_single_frame_tiny_crop_still_reaches_the_head(name):
    model = build_model(name, num_classes=3, width=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 1, 8, 8)).shape == (1, 3)


def test_c3d_keeps_time_at_ten_frames():
    # Classic floor pooling would take 10 frames to 0 before conv5; ceil pooling leaves 2.
    model = build_model("c3d", num_classes=2, width=4).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 10, 32, 32)).shape[2] == 2


@pytest.mark.parametrize(
    "name,reference",
    [
        ("r3d_18", torchvision.models.video.r3d_18),
        ("mc3_18", torchvision.models.video.mc3_18),
        ("r2plus1d_18", torchvision.models.video.r2plus1d_18),
    ],
)
def test_width_64_matches_torchvision_parameter_count(name, reference):
    with torch.device("meta"):
        ours = build_model(name, num_classes=400, width=64)
        theirs = reference(num_classes=400)
    assert count_params(ours) == count_params(theirs)
    assert [tuple(p.shape) for p in ours.backbone.parameters()] == [
        tuple(p.shape) for n, p in theirs.named_parameters() if not n.startswith("fc.")
    ]


# Parameter counts of the VCOP/PCL code's R3DNet((1, 1, 1, 1)) and R2Plus1DNet((1, 1, 1, 1)) without
# their classifier, summed by hand from their layers (stem, four one-block stages with a projected
# shortcut in the three strided ones, BatchNorm weight and bias; no convolution bias).
PCL_CODE_PARAMS = {"r3d_10": 14_361_792, "r2plus1d_10": 14_365_303}


@pytest.mark.parametrize("name", sorted(PCL_CODE_PARAMS))
def test_the_papers_10_layer_resnets_match_the_pcl_codes_parameter_count(name):
    with torch.device("meta"):
        trunk = build_model(name, num_classes=101, width=64).backbone
    assert count_params(trunk) == pytest.approx(PCL_CODE_PARAMS[name], rel=0.01)
    with torch.device("meta"):
        c3d = build_model("c3d", num_classes=101, width=64).backbone
        r3d_18 = build_model("r3d_18", num_classes=101, width=64).backbone
    assert count_params(trunk) < count_params(c3d) < count_params(r3d_18)  # the papers' size order


@pytest.mark.parametrize("name", sorted(PCL_CODE_PARAMS))
def test_the_10_layer_resnets_halve_time_and_space_in_each_strided_stage(name):
    model = build_model(name, num_classes=5, width=4).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 16, 112, 112)).shape == (1, 32, 2, 7, 7)


def test_c3d_width_64_has_the_published_channels():
    with torch.device("meta"):
        model = build_model("c3d", num_classes=101, width=64)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs == [64, 128, 256, 256, 512, 512, 512, 512]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_scales_parameters(name):
    with torch.device("meta"):
        sizes = [count_params(build_model(name, num_classes=10, width=w)) for w in (4, 8, 16)]
    assert sizes[0] < sizes[1] < sizes[2]
    # Convolutions dominate, and their weights grow with width squared.
    assert sizes[2] / sizes[1] > 3


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'c4d'") as info:
        build_model("c4d", num_classes=10)
    for name in MODELS:
        assert name in str(info.value)


def test_bad_width_is_rejected():
    with pytest.raises(ValueError, match="width"):
        build_model("c3d", num_classes=10, width=0)


def test_dropout_is_in_the_head():
    model = build_model("tiny3d", num_classes=4, width=4, dropout=0.3)
    assert model.head.dropout.p == 0.3


def test_describe_counts_params_and_conv_flops():
    info = describe("tiny3d", num_classes=5, width=4, clip_len=4, crop=16)
    model = build_model("tiny3d", num_classes=5, width=4)
    assert info["params"] == count_params(model)
    # First conv alone: 2 * (3*27) MACs per output element, 4 channels, 4x16x16 positions.
    first_conv = 2 * 3 * 27 * 4 * 4 * 16 * 16
    assert info["flops"] > first_conv
    bigger = describe("tiny3d", num_classes=5, width=4, clip_len=8, crop=16)
    assert bigger["flops"] == pytest.approx(2 * info["flops"], rel=0.05)


@pytest.mark.parametrize(
    "name,weights",
    [
        ("r3d_18", torchvision.models.video.R3D_18_Weights.KINETICS400_V1),
        ("mc3_18", torchvision.models.video.MC3_18_Weights.KINETICS400_V1),
        ("r2plus1d_18", torchvision.models.video.R2Plus1D_18_Weights.KINETICS400_V1),
    ],
)
def test_describe_full_size_matches_torchvision_published_cost(name, weights):
    # torchvision's metadata (no download) lists GMACs for a 16x112x112 clip; FLOPs count 2 per MAC.
    info = describe(name, num_classes=400, width=64, clip_len=16, crop=112)
    assert info["params"] == weights.meta["num_params"]
    assert info["flops"] / 2 / 1e9 == pytest.approx(weights.meta["_ops"], abs=0.001)


def test_residual_frames_follow_pcl():
    from kdhar.models import residual_frames

    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 2, 2) ** 1.5
    r = residual_frames(x)
    assert r.shape == x.shape
    assert torch.equal(r[:, :, 1:], x[:, :, :-1] - x[:, :, 1:])
    assert torch.equal(r[:, :, 0], x[:, :, -1] - x[:, :, 0])  # circular, as upstream


def test_res_models_see_residuals_and_bad_modalities_are_refused():
    torch.manual_seed(0)
    rgb = build_model("tiny3d", 5, width=4, modality="rgb").eval()
    res = build_model("tiny3d", 5, width=4, modality="res").eval()
    res.load_state_dict(rgb.state_dict())  # no weights of its own: the residual is an input transform
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        assert torch.allclose(res(x), rgb(torch.roll(x, 1, dims=2) - x))
        assert not torch.allclose(res(x), rgb(x))
    with pytest.raises(ValueError, match="modality must be one of rgb, res"):
        build_model("tiny3d", 5, width=4, modality="flow")


def test_a_new_knob_at_its_neutral_value_keeps_earlier_runs_identities():
    # Grids skip cells whose config hash already has a FINISHED run; adding `modality` (rgb = what
    # every earlier run was) must not make them train again. The values are the hashes of the
    # default configuration computed before the knob existed.
    import dataclasses

    from kdhar.config import RunConfig
    from kdhar.train import config_hash

    cfg = RunConfig()
    assert config_hash(cfg, None, None) == "85fe348504e107d3"
    assert config_hash(cfg, "runs:/abc", None) == "981f56a51519da8e"
    res = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, modality="res"))
    assert config_hash(res, None, None) != config_hash(cfg, None, None)
