"""LR-ASPP head (paper §6.4, Fig. 10): both gates, small inputs, torchvision-compatible names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads.lraspp import LargeKernelAvgPool, LRASPPHead


def _features(low_hw: tuple[int, int], high_hw: tuple[int, int], n: int = 2) -> dict:
    return {"low": torch.randn(n, 40, *low_hw), "high": torch.randn(n, 96, *high_hw)}


@pytest.mark.parametrize("pooling", ["global", "paper"])
@pytest.mark.parametrize(
    ("low_hw", "high_hw"),
    [
        ((1, 1), (1, 1)),
        ((4, 4), (2, 2)),
        ((7, 13), (4, 7)),
        ((64, 128), (32, 64)),
        ((128, 256), (64, 128)),
    ],
)
def test_head_output_shape_at_many_sizes(pooling, low_hw, high_hw):
    head = LRASPPHead(40, 96, num_classes=19, pooling=pooling).eval()
    out = head(_features(low_hw, high_hw))
    assert out.shape == (2, 19, *low_hw)
    assert torch.isfinite(out).all()


def test_paper_pool_does_not_crash_on_maps_smaller_than_the_kernel():
    # mmsegmentation's AvgPool2d(49, (16, 20)) raises here: 8x16 < 49x49.
    x = torch.randn(1, 8, 8, 16)
    with pytest.raises(RuntimeError):
        torch.nn.AvgPool2d(49, (16, 20))(x)
    pooled = LargeKernelAvgPool()(x)
    torch.testing.assert_close(pooled, x.mean(dim=(2, 3), keepdim=True))


def test_paper_pool_at_training_size_is_local():
    # 1024x2048 at output stride 16 = 64x128 cells -> a 1x4 grid of 49x49 windows.
    x = torch.randn(1, 3, 64, 128)
    pooled = LargeKernelAvgPool()(x)
    assert pooled.shape == (1, 3, 1, 4)
    torch.testing.assert_close(pooled[..., 0, 1], x[..., :49, 20:69].mean(dim=(-2, -1)))
    # Only one dimension smaller than the kernel: clamped there, sliding along the other.
    y = torch.randn(1, 3, 20, 128)
    assert LargeKernelAvgPool()(y).shape == (1, 3, 1, 4)


def test_paper_gate_equals_global_gate_on_small_maps():
    torch.manual_seed(0)
    glob = LRASPPHead(40, 96, 19, pooling="global").eval()
    paper = LRASPPHead(40, 96, 19, pooling="paper").eval()
    paper.load_state_dict(glob.state_dict())  # same keys: pooling has no parameters
    feats = _features((16, 32), (8, 16))
    torch.testing.assert_close(paper(feats), glob(feats))


def test_paper_gate_is_spatially_varying_and_upsampled_to_the_map():
    torch.manual_seed(0)
    head = LRASPPHead(40, 96, 19, pooling="paper").eval()
    high = torch.randn(1, 96, 64, 128)
    gate = head.gate(high)
    assert gate.shape == (1, 128, 64, 128)
    assert (gate >= 0).all() and (gate <= 1).all()
    # One window row: constant down each column; four window columns: varies along a row.
    assert (gate - gate[..., :1, :]).abs().max() < 1e-6
    assert (gate[..., 0, 0] - gate[..., 0, -1]).abs().max() > 1e-3
    # The gate is the bilinear upsampling of the 1x4 grid of window gates.
    grid = torch.sigmoid(head.scale[1](F.avg_pool2d(high, 49, (16, 20))))
    expected = F.interpolate(grid, size=(64, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(gate, expected)


def test_head_is_the_paper_computation():
    torch.manual_seed(0)
    head = LRASPPHead(40, 96, 5, inter_channels=16).eval()
    feats = _features((8, 8), (4, 4), n=1)
    low, high = feats["low"], feats["high"]
    x = head.cbr(high) * torch.sigmoid(head.scale[1](high.mean(dim=(2, 3), keepdim=True)))
    x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    expected = head.low_classifier(low) + head.high_classifier(x)
    torch.testing.assert_close(head(feats), expected)


def test_state_dict_names_match_torchvision():
    from torchvision.models.segmentation.lraspp import LRASPPHead as TVHead

    ours = LRASPPHead(40, 96, 19, inter_channels=128, pooling="paper")
    theirs = TVHead(40, 96, 19, 128)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


@pytest.mark.parametrize(
    "kwargs",
    [{"pooling": "max"}, {"num_classes": 0}, {"pool_kernel": (0, 3), "pooling": "paper"}],
)
def test_bad_arguments_raise_value_error(kwargs):
    args = {"low_channels": 40, "high_channels": 96, "num_classes": 19, **kwargs}
    with pytest.raises(ValueError):
        LRASPPHead(**args)


def test_gradients_flow_through_both_branches():
    head = LRASPPHead(40, 96, 19, pooling="paper")
    feats = _features((16, 16), (8, 8))
    for v in feats.values():
        v.requires_grad_(True)
    head(feats).sum().backward()
    assert feats["low"].grad.abs().sum() > 0 and feats["high"].grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())
