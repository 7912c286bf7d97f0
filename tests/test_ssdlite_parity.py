"""torchvision SSDLite checkpoints loaded through mnv3det.ssdlite give torchvision's detections.

torchvision models get random weights (scaled so that no two top scores tie: with ties the order
of equal-score detections is arbitrary in torchvision itself) and randomised BatchNorm statistics.

Input conversion: none. Both detectors take the same images in [0, 1] and normalise inside with
mean = std = 0.5 (torchvision's ``GeneralizedRCNNTransform`` with ``image_mean``/``image_std``,
ours with :data:`mnv3det.models.normalize.SSDLITE_MEAN`/``SSDLITE_STD``), then resize.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import randomize_bn_stats
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor

import mnv3det
from mnv3det.weights import CheckpointMismatchError


def _diversify(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random conv weights of unit gain and random biases, then random BN statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return randomize_bn_stats(model, seed)


def _tv_ssdlite(arch: str, reduced_tail: bool, size: int, num_classes: int) -> SSD:
    """torchvision's ssdlite320 construction, for any arch / tail / size."""
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    builder = mobilenet_v3_large if arch == "large" else mobilenet_v3_small
    backbone = _mobilenet_extractor(builder(norm_layer=norm, reduced_tail=reduced_tail), 6, norm)
    channels = det_utils.retrieve_out_channels(backbone, (size, size))
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    head = SSDLiteHead(channels, anchors.num_anchors_per_location(), num_classes, norm)
    return SSD(
        backbone, anchors, (size, size), num_classes, head=head, score_thresh=0.001,
        nms_thresh=0.55, detections_per_img=300, topk_candidates=300,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )  # fmt: skip


def _images(sizes: list[tuple[int, int]], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:  # smooth colour gradients plus noise: natural-ish statistics
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        base = torch.stack([yy, xx, (yy + xx) / 2])
        out.append((0.6 * base + 0.4 * torch.rand(3, h, w, generator=gen)).clamp(0, 1))
    return out


def _canonical(det: dict) -> dict:
    """Order equal-score detections by label, then x1 (torchvision sorts scores with an unstable
    sort, so the order *within* a run of exactly equal float32 scores is arbitrary; everything
    else keeps its order)."""
    order = det["boxes"][:, 0].sort(stable=True)[1]
    order = order[det["labels"][order].sort(stable=True)[1]]
    order = order[det["scores"][order].sort(descending=True, stable=True)[1]]
    return {k: v[order] for k, v in det.items()}


def _assert_same(expected: list[dict], ours: list[dict]) -> float:
    worst = 0.0
    for e, o in zip(expected, ours, strict=True):
        e, o = _canonical(e), _canonical(o)
        assert len(e["boxes"]) > 0
        assert len(o["boxes"]) == len(e["boxes"])
        assert torch.equal(o["labels"], e["labels"])  # identical labels, identical order
        torch.testing.assert_close(o["scores"], e["scores"], rtol=1e-4, atol=1e-6)
        err = (o["boxes"] - e["boxes"]).abs().max().item()
        assert err < 1e-3, f"boxes differ by {err} px"
        worst = max(worst, err)
    return worst


def test_torchvision_ssdlite320_checkpoint_file_same_detections(tmp_path) -> None:
    tv = _diversify(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)).eval()
    path = tmp_path / "ssdlite320_mobilenet_v3_large.pth"
    torch.save(tv.state_dict(), path)
    # the published checkpoint is reduced-tail (torchvision's builder: reduce_tail when no
    # weights_backbone, and weights= clears weights_backbone): 3,440,060 parameters.
    assert sum(p.numel() for p in tv.parameters()) == 3_440_060
    # DESIGN.md's call: reduced_tail is read from the checkpoint when not given.
    ours = mnv3det.ssdlite("large", num_classes=91, size=320, weights=path).eval()
    assert ours.backbone.reduced_tail
    assert ours.weights_report.format == "torchvision" and not ours.weights_report.unused
    images = _images([(320, 320), (240, 400), (500, 300), (97, 131)])
    with torch.no_grad():
        expected = tv(images)
        got = ours(images)
        same_size = torch.stack(_images([(360, 480)] * 2, seed=5))
        expected_batch = tv(list(same_size))
        got_batch = ours(same_size)  # a batched tensor works too
    _assert_same(expected, got)
    _assert_same(expected_batch, got_batch)
    # boxes are in each input image's own pixels
    for image, det in zip(images, got, strict=True):
        assert det["boxes"][:, 2].max() <= image.shape[-1] + 1e-3
        assert det["boxes"][:, 3].max() <= image.shape[-2] + 1e-3


@pytest.mark.parametrize(
    ("arch", "reduced_tail", "size"),
    [("large", False, 512), ("small", False, 320), ("small", True, 640)],
)
def test_other_variants_and_sizes_same_detections(arch: str, reduced_tail: bool, size: int) -> None:
    tv = _diversify(_tv_ssdlite(arch, reduced_tail, size, num_classes=21), seed=2).eval()
    ours = mnv3det.ssdlite(
        arch, num_classes=21, size=size, reduced_tail=reduced_tail, weights=tv.state_dict()
    ).eval()
    images = _images([(size, size), (300, 420)], seed=3)
    with torch.no_grad():
        _assert_same(tv(images), ours(images))


def test_training_losses_equal_torchvision() -> None:
    tv = _diversify(
        ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)
    )
    ours = mnv3det.ssdlite("large", num_classes=5, reduced_tail=True, weights=tv.state_dict())
    tv.train()
    ours.train()
    images = _images([(320, 320), (200, 260)], seed=4)
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 150.0, 200.0], [160.0, 40.0, 300.0, 120.0]]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[30.0, 30.0, 120.0, 190.0]]), "labels": torch.tensor([4])},
    ]  # fmt: skip
    expected = tv(images, [dict(t) for t in targets])
    got = ours(images, targets)
    assert set(got) == {"bbox_regression", "classification"}
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


def test_checkpoint_of_other_tail_is_a_clear_error(tmp_path) -> None:
    tv = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    with pytest.raises(
        CheckpointMismatchError, match=r"backbone\.features\.13\.block\.3.*reduced_tail"
    ):
        mnv3det.ssdlite("large", reduced_tail=False, weights=path)
    with pytest.raises(CheckpointMismatchError, match=r"head\.classification_head"):
        mnv3det.ssdlite("large", num_classes=21, reduced_tail=True, weights=path)


def test_reduced_tail_is_read_from_the_checkpoint_when_not_given() -> None:
    full = mnv3det.ssdlite("small", num_classes=3, size=128, reduced_tail=False)
    reduced = mnv3det.ssdlite("small", num_classes=3, size=128, reduced_tail=True)
    assert not mnv3det.ssdlite(
        "small", num_classes=3, weights=full.state_dict()
    ).backbone.reduced_tail
    assert mnv3det.ssdlite(
        "small", num_classes=3, weights=reduced.state_dict()
    ).backbone.reduced_tail
    assert not mnv3det.ssdlite("small", num_classes=3).backbone.reduced_tail  # no weights: full
