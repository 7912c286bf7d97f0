"""torchvision's lraspp_mobilenet_v3_large checkpoint loads into mnv3det.lraspp with the same logits.

Input conversion: ours takes images in [0, 1] and normalises inside (ImageNet mean/std);
torchvision's model takes them ImageNet-normalised. Every comparison feeds ``x`` in [0, 1] to
ours and ``tv_input(x)`` (torchvision's own ``normalize`` with the ImageNet constants) to
torchvision's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn_stats
from torchvision.models.segmentation import lraspp_mobilenet_v3_large
from torchvision.transforms.functional import normalize

import mnv3det
from mnv3det.weights import CheckpointMismatchError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def tv_input(x: torch.Tensor) -> torch.Tensor:
    """What torchvision's LR-ASPP takes for our ``[0, 1]`` input ``x``."""
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module")
def tv_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    randomize_bn_stats(tv, seed=1).eval()
    path = tmp_path_factory.mktemp("tv") / "lraspp_mobilenet_v3_large.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def test_torchvision_checkpoint_gives_same_logits(tv_checkpoint):
    tv, path = tv_checkpoint
    ours = mnv3det.lraspp("large", num_classes=21, reduced_tail=False, weights=path).eval()
    # torchvision taps the first stride-8 block; the automatic low_tap picks it for its weights.
    assert ours.low_tap == "stage3_first"
    assert ours.weights_report is not None and ours.weights_report.format == "torchvision"
    assert ours.weights_report.unused == []
    torch.manual_seed(0)
    for size in [(160, 224), (97, 131)]:  # odd size: interpolation and dilation edge cases
        x = torch.rand(2, 3, *size)
        with torch.no_grad():
            expected = tv(tv_input(x))["out"]
            got = ours(x)
        assert got.shape == expected.shape == (2, 21, *size)
        assert expected.abs().max() > 0.1  # the comparison is not between two near-zero maps
        assert (got - expected).abs().max() < 1e-4


def test_torchvision_state_dict_in_memory_and_explicit_wrong_tap(tv_checkpoint):
    tv, _ = tv_checkpoint
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        expected = tv(tv_input(x))["out"]
        same = mnv3det.lraspp("large", 21, reduced_tail=False, weights=tv.state_dict()).eval()(x)
        # Forcing the paper's tap (end of the stride-8 stage) is allowed but is another model.
        other = mnv3det.lraspp(
            "large", 21, reduced_tail=False, weights=tv.state_dict(), low_tap="stage3"
        ).eval()(x)
    assert (same - expected).abs().max() < 1e-4
    assert (other - expected).abs().max() > 1e-3


def test_reduced_tail_or_class_count_mismatch_names_keys(tv_checkpoint):
    _, path = tv_checkpoint
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.features\.13.*reduced_tail"):
        mnv3det.lraspp("large", num_classes=21, reduced_tail=True, weights=path)
    with pytest.raises(CheckpointMismatchError, match=r"classifier\.low_classifier\.weight"):
        mnv3det.lraspp("large", num_classes=19, reduced_tail=False, weights=path)


def test_non_lraspp_checkpoint_is_a_clear_error(tmp_path):
    from torchvision.models import mobilenet_v3_large

    from mnv3det.models.lraspp import WeightsFormatError

    path = tmp_path / "imagenet.pth"
    torch.save(mobilenet_v3_large().state_dict(), path)
    with pytest.raises(WeightsFormatError, match="weights_backbone"):
        mnv3det.lraspp("large", weights=path)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        mnv3det.lraspp("large", weights=tmp_path / "missing.pth")
