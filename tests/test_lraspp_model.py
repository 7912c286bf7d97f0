"""mnv3det.lraspp: variants, taps, output strides, weight loading (paper §6.4)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn_stats

import mnv3det
from mnv3det.models.lraspp import LRASPP
from mnv3det.models.normalize import IMAGENET_MEAN, IMAGENET_STD


@pytest.mark.parametrize(
    ("arch", "width", "reduced_tail", "dilated", "low_ch", "high_ch", "os"),
    [
        ("large", 1.0, True, True, 40, 480, 16),
        ("large", 1.0, False, True, 40, 960, 16),
        ("large", 1.0, True, False, 40, 480, 32),
        ("small", 1.0, True, True, 24, 288, 16),
        ("small", 0.5, True, True, 16, 144, 16),
        ("large", 0.75, True, True, 32, 384, 16),
    ],
)
def test_variants_shapes_and_taps(arch, width, reduced_tail, dilated, low_ch, high_ch, os):
    model = mnv3det.lraspp(
        arch, num_classes=19, width_mult=width, reduced_tail=reduced_tail, dilated=dilated
    ).eval()
    assert isinstance(model, LRASPP)
    assert model.output_stride == os
    assert model.classifier.low_classifier.in_channels == low_ch
    assert model.classifier.cbr[0].in_channels == high_ch
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        feats = model.features(x)
        out = model(x)
    assert feats["low"].shape[-2:] == (12, 20)
    assert feats["high"].shape[-2:] == (96 // os, 160 // os)
    assert out.shape == (2, 19, 96, 160)


def test_paper_model_size():
    # Paper Table 7 reports 1.51M (Large RF2 + LR-ASPP) / 0.47M (Small) parameters; our count
    # includes every BatchNorm affine parameter and the 19-class classifiers with biases.
    large = sum(p.numel() for p in mnv3det.lraspp("large").parameters())
    small = sum(p.numel() for p in mnv3det.lraspp("small").parameters())
    assert 1.4e6 < large < 1.9e6
    assert 0.4e6 < small < 0.6e6


def test_low_taps_differ_and_first_block_is_features_4():
    model = mnv3det.lraspp("large").eval()
    first_model = mnv3det.lraspp("large", low_tap="stage3_first").eval()
    first_model.load_state_dict(model.state_dict())
    # the alias is the backbone's block tap: block4 = torchvision's features[4]
    assert [f.name for f in first_model.backbone.feature_info] == ["block4", "last_conv"]
    assert first_model.low_tap == "stage3_first"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        stage3 = model.features(x)["low"]
        first = first_model.features(x)["low"]
        manual = model.backbone.features[:5](model.normalize(x))
    torch.testing.assert_close(first, manual)
    assert stage3.shape == first.shape and not torch.allclose(stage3, first)
    with pytest.raises(AttributeError):
        model.low_tap = "stage3_first"  # fixed at construction: it decides the backbone's taps


@pytest.mark.parametrize(
    ("arch", "low_tap", "tap"),
    [
        ("large", "block5", "block5"),
        ("large", "stage4_expand", "stage4_expand"),
        ("small", "stage3_first", "block2"),
    ],
)
def test_any_stride_8_tap_feeds_the_low_branch(arch, low_tap, tap):
    model = mnv3det.lraspp(arch, width_mult=0.5, low_tap=low_tap).eval()
    low, _ = model.backbone.feature_info
    assert (low.name, low.stride) == (tap, 8)
    assert model.classifier.low_classifier.in_channels == low.channels
    assert model.description["low_tap"] == low_tap
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 19, 64, 64)


@pytest.mark.parametrize("pooling", ["global", "paper"])
@pytest.mark.parametrize("size", [(33, 47), (64, 64), (256, 512)])
def test_both_gates_any_input_size(pooling, size):
    model = mnv3det.lraspp("small", pooling=pooling, width_mult=0.5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 19, *size)


def test_own_checkpoint_round_trip_and_lightning_prefix(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn_stats(mnv3det.lraspp("small", pooling="paper")).eval()
    path = tmp_path / "ours.pth"
    torch.save(model.state_dict(), path)
    # A Lightning checkpoint of the task: {"state_dict": {"model.<key>": ...}, ...}.
    lightning_path = tmp_path / "task.ckpt"
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
        lightning_path,
    )
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        for source in (path, lightning_path):
            loaded = mnv3det.lraspp("small", pooling="paper", weights=source).eval()
            assert loaded.low_tap == "stage3" and loaded.weights_report.format == "mnv3det"
            torch.testing.assert_close(loaded(x), expected)


def test_weights_backbone_loads_torchvision_imagenet_backbone(tmp_path):
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(0)
    tv = randomize_bn_stats(mobilenet_v3_large()).eval()
    path = tmp_path / "imagenet.pth"
    torch.save(tv.state_dict(), path)
    with pytest.warns(UserWarning, match="unused"):
        model = mnv3det.lraspp(
            "large", reduced_tail=False, dilated=False, weights_backbone=path
        ).eval()
    # ours takes [0, 1] images and normalises inside; torchvision's backbone gets them normalised
    x = torch.rand(1, 3, 64, 64)
    normalised = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(model.features(x)["high"], tv.features(normalised))


def test_bad_arguments():
    with pytest.raises(ValueError, match="low_tap"):
        mnv3det.lraspp("large", low_tap="stage4")
    with pytest.raises(ValueError, match=r"low_tap.*stride-8.*block4.*'nope'"):
        mnv3det.lraspp("large", low_tap="nope")
    with pytest.raises(ValueError, match="pooling"):
        mnv3det.lraspp("large", pooling="max")
    with pytest.raises(ValueError, match="num_classes"):
        mnv3det.lraspp("large", num_classes=0)
    with pytest.raises(ValueError, match="arch"):
        mnv3det.lraspp("medium")


def test_trains_one_step_with_frozen_stages():
    model = mnv3det.lraspp("small", width_mult=0.5, frozen_stages=2)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=255)
    loss.backward()
    assert model.backbone.features[0][0].weight.grad is None
    assert model.classifier.low_classifier.weight.grad is not None
