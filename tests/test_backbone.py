"""Backbone structure: paper tables, taps, feature_info, pruning, freezing and norm options."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import mnv3det
from mnv3det.backbone import FeatureInfo, block_stages, count_madds, count_parameters
from mnv3det.blocks import InvertedResidual, make_divisible
from mnv3det.info import PAPER_MADDS, describe_variant, info_table


@pytest.mark.parametrize(("arch", "params"), [("large", 5_483_032), ("small", 2_542_856)])
def test_parameter_count_with_classifier_matches_torchvision(arch: str, params: int) -> None:
    info = describe_variant(arch)
    tv = getattr(torchvision.models, f"mobilenet_v3_{arch}")()
    assert info.params_with_classifier == params == count_parameters(tv)


@pytest.mark.parametrize("arch", ["large", "small"])
def test_madds_within_5_percent_of_paper(arch: str) -> None:
    madds = describe_variant(arch).madds_224
    assert abs(madds - PAPER_MADDS[arch]) / PAPER_MADDS[arch] < 0.05


@pytest.mark.parametrize("width", [0.35, 0.5, 0.75, 1.0, 1.25])
@pytest.mark.parametrize("arch", ["large", "small"])
def test_every_width_matches_torchvision_parameter_count(arch: str, width: float) -> None:
    tv = getattr(torchvision.models, f"mobilenet_v3_{arch}")(width_mult=width)
    assert describe_variant(arch, width).params_with_classifier == count_parameters(tv)


def test_paper_block_details_large() -> None:
    bb = mnv3det.mobilenet_v3("large", taps=["last_conv"])
    blocks = [m for m in bb.features if isinstance(m, InvertedResidual)]
    assert len(blocks) == 15
    first = blocks[0]
    assert not first.has_expansion and first.use_res_connect  # no expansion conv in block 1
    # SE squeeze = make_divisible(exp / 4, 8) with a hard-sigmoid gate
    se_block = blocks[3]
    se = se_block.block[2]
    assert se.fc1.out_channels == make_divisible(72 // 4, 8) == 24
    assert isinstance(se.scale_activation, nn.Hardsigmoid)
    # activations per row: ReLU for the first 6 rows, h-swish afterwards
    assert isinstance(blocks[5].block[1][2], nn.ReLU)
    assert isinstance(blocks[6].block[1][2], nn.Hardswish)
    # residual only at stride 1 with equal channels
    for block in blocks:
        cfg = block.cfg
        assert block.use_res_connect == (cfg.stride == 1 and cfg.in_channels == cfg.out_channels)
    # BatchNorm as torchvision: eps 1e-3, momentum 0.01
    bn = bb.features[0][1]
    assert (bn.eps, bn.momentum) == (0.001, 0.01)


def test_small_has_eleven_blocks_and_576_last_conv() -> None:
    bb = mnv3det.mobilenet_v3("small", taps=["last_conv"])
    assert sum(isinstance(m, InvertedResidual) for m in bb.features) == 11
    assert bb.feature_info[0].channels == 576


def test_available_taps_large() -> None:
    taps = {t.name: (t.channels, t.stride) for t in mnv3det.mobilenet_v3("large").available_taps()}
    assert taps["stage1"] == (16, 2)
    assert taps["stage2"] == (24, 4)
    assert taps["stage3"] == (40, 8)
    assert taps["stage4"] == (112, 16)
    assert taps["stage5"] == (160, 32)
    assert taps["last_conv"] == (960, 32)
    assert taps["stage5_expand"] == (672, 16)  # SSDLite C4 (paper §6.3)


def test_reduced_tail_and_dilation_change_tail_only() -> None:
    taps = {
        t.name: (t.channels, t.stride)
        for t in mnv3det.mobilenet_v3("large", reduced_tail=True, dilated=True).available_taps()
    }
    assert taps["stage5_expand"] == (672, 16)  # first stride-32 block keeps its expansion
    assert taps["stage5"] == (80, 16)
    assert taps["last_conv"] == (480, 16)


def test_block_taps_are_torchvision_features_with_stride() -> None:
    bb = mnv3det.mobilenet_v3("large", taps=[4, "stage3", "block13"]).eval()
    assert bb.feature_info == [
        FeatureInfo("block4", 40, 8),  # first stride-8 block (torchvision's LR-ASPP low tap)
        FeatureInfo("stage3", 40, 8),
        FeatureInfo("block13", 160, 32),
    ]
    assert len(bb.features) == 14  # nothing past block 13 (features[13]) is built
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = bb(x)
        torch.testing.assert_close(out["block4"], bb.features[:5](x))
        torch.testing.assert_close(out["stage3"], bb.features[:7](x))
    taps = {t.name: t for t in mnv3det.mobilenet_v3("large").available_taps()}
    strides = [taps[f"block{i}"].stride for i in range(1, 16)]
    assert strides == [2, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32]
    assert (taps["block6"].channels, taps["block6"].stride) == (taps["stage3"].channels, 8)
    dilated = {t.name: t for t in mnv3det.mobilenet_v3("large", dilated=True).available_taps()}
    assert [dilated[f"block{i}"].stride for i in (12, 13, 15)] == [16, 16, 16]
    small = [t.name for t in mnv3det.mobilenet_v3("small").available_taps(blocks=False)]
    assert not any(name.startswith("block") for name in small) and "stage5_expand" in small
    with pytest.raises(ValueError, match=r"unknown tap.*'block16'.*block1 \.\. block15"):
        mnv3det.mobilenet_v3("large", taps=[16])


def test_forward_returns_selected_taps_in_stride_order_with_shapes() -> None:
    bb = mnv3det.mobilenet_v3("large", taps=["last_conv", "stage3", "stage5_expand"]).eval()
    x = torch.randn(2, 3, 128, 96)
    out = bb(x)
    assert list(out) == ["stage3", "stage5_expand", "last_conv"]
    for info, (name, feat) in zip(bb.feature_info, out.items()):
        assert info.name == name
        assert feat.shape == (2, info.channels, 128 // info.stride, 96 // info.stride)


def test_layers_past_deepest_tap_are_not_kept() -> None:
    bb = mnv3det.mobilenet_v3("large", taps=["stage3"])
    assert len(bb.features) == 7  # stem + 6 blocks up to stride 8
    assert not any(k.startswith("features.7.") for k in bb.state_dict())


def test_unknown_tap_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown tap.*'c4'.*stage5_expand"):
        mnv3det.mobilenet_v3("large", taps=["c4"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "medium"}, "arch must be one of"),
        ({"width_mult": 0}, "width_mult must be > 0"),
        ({"frozen_stages": 7}, "frozen_stages"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mnv3det.mobilenet_v3(**kwargs)


def test_frozen_stages_have_no_grad_and_stay_in_eval() -> None:
    bb = mnv3det.mobilenet_v3("large", frozen_stages=2)
    bb.train()
    stem, stage2_block, stage3_block = bb.features[0], bb.features[3], bb.features[4]
    assert not any(p.requires_grad for p in stem.parameters())
    assert not any(p.requires_grad for p in stage2_block.parameters())
    assert all(p.requires_grad for p in stage3_block.parameters())
    assert not stem.training and not stage2_block.training and stage3_block.training


def test_norm_eval_keeps_batchnorm_statistics_fixed() -> None:
    bb = mnv3det.mobilenet_v3("small", taps=["stage3"], norm_eval=True).train()
    before = bb.features[0][1].running_mean.clone()
    bb(torch.randn(2, 3, 64, 64)).popitem()[1].sum().backward()
    assert torch.equal(before, bb.features[0][1].running_mean)
    assert bb.features[0][1].weight.grad is not None  # affine params still train


def test_frozen_bn_replaces_batchnorm_and_keeps_outputs() -> None:
    ref = mnv3det.mobilenet_v3("small", taps=["stage4"]).eval()
    frozen = mnv3det.mobilenet_v3(
        "small", taps=["stage4"], weights=ref.state_dict(), frozen_bn=True
    )
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(frozen.train()(x)["stage4"], ref(x)["stage4"])


@pytest.mark.parametrize("norm", [partial(nn.GroupNorm, 8), nn.SyncBatchNorm])
def test_norm_layer_argument(norm) -> None:
    bb = mnv3det.mobilenet_v3("large", taps=["stage4"], norm_layer=norm)
    assert isinstance(bb.features[0][1], norm.func if isinstance(norm, partial) else norm)
    if norm is not nn.SyncBatchNorm:  # SyncBatchNorm needs a process group in train mode
        out = bb(torch.randn(2, 3, 64, 64))["stage4"]
        assert torch.isfinite(out).all()


def test_info_table_lists_every_variant_and_tap() -> None:
    table = info_table((("large", 1.0, False), ("small", 0.5, True)))
    assert "| large x1.0 | 2,971,952 | 5,483,032 |" in table
    assert "small x0.5 reduced_tail" in table
    assert "stage5_expand:672@16" in table
    assert "last_conv:960@32 block1..15" in table


def test_block_stages() -> None:
    assert block_stages("large") == [1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 5, 5, 5]
    assert block_stages("small") == [2, 3, 3, 4, 4, 4, 4, 4, 5, 5, 5]


def test_cli_info_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    from mnv3det.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "5,483,032" in out and "2,542,856" in out


def test_count_madds_counts_a_conv() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_madds(conv, size=10) == 8 * 3 * 9 * 100
