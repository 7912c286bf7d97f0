"""heads.ssdlite against torchvision's SSD pieces: default boxes, matching, loss, NMS, post-processing."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TVDefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from heads.ssdlite import (
    BoxCoder,
    DefaultBoxGenerator,
    SSDLiteExtras,
    SSDLiteHead,
    match_anchors,
    multibox_loss,
    postprocess_detections,
)

RATIOS = [[2, 3]] * 6


def _grids(h: int, w: int) -> list[tuple[int, int]]:
    """Feature-map sizes of SSDLite-MobileNetV3 (strides 16, 32, then four stride-2 convs)."""
    sizes = []
    for stride in (16, 32):
        sizes.append((-(-h // stride), -(-w // stride)))
    for _ in range(4):
        ph, pw = sizes[-1]
        sizes.append(((ph - 1) // 2 + 1, (pw - 1) // 2 + 1))
    return sizes


@pytest.mark.parametrize("hw", [(320, 320), (512, 512), (640, 640), (256, 384)])
def test_default_boxes_equal_torchvision(hw: tuple[int, int]) -> None:
    grids = _grids(*hw)
    ours = DefaultBoxGenerator(RATIOS, 0.2, 0.95)(grids, hw)
    tv = TVDefaultBoxGenerator(RATIOS, min_ratio=0.2, max_ratio=0.95)
    feats = [torch.zeros(1, 1, *g) for g in grids]
    expected = tv(ImageList(torch.zeros(1, 3, *hw), [hw]), feats)[0]
    assert torch.equal(ours, expected)
    assert ours.shape[0] == sum(6 * gh * gw for gh, gw in grids)
    if hw == (320, 320):
        assert ours.shape[0] == 3234  # torchvision's ssdlite320 anchor count


def test_default_boxes_follow_feature_maps_and_cover_image() -> None:
    gen = DefaultBoxGenerator(RATIOS, 0.2, 0.95)
    for size in (320, 512, 640):
        boxes = gen(_grids(size, size), (size, size))
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        assert centres.min() > 0 and centres.max() < size  # centres on every grid, inside
        # the largest default box spans the image: sizes are fractions of the input
        assert (boxes[:, 2] - boxes[:, 0]).max() == pytest.approx(size, rel=1e-5)
    assert gen.num_anchors_per_location() == [6] * 6


def test_extras_and_head_shapes() -> None:
    extras = SSDLiteExtras(960, width_mult=1.0)
    assert extras.out_channels == [512, 256, 256, 128]
    assert SSDLiteExtras(480, width_mult=0.1).out_channels == [51, 25, 25, 16]  # min depth 16
    feats = extras(torch.randn(2, 960, 10, 10))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (512, 5, 5),
        (256, 3, 3),
        (256, 2, 2),
        (128, 1, 1),
    ]
    head = SSDLiteHead([672, 960, 512, 256, 256, 128], [6] * 6, num_classes=5)
    maps = [torch.randn(2, 672, 20, 20), torch.randn(2, 960, 10, 10), *feats]
    out = head(maps)
    assert out["cls_logits"].shape == (2, 3234, 5)
    assert out["bbox_regression"].shape == (2, 3234, 4)
    with pytest.raises(ValueError, match="num_classes"):
        SSDLiteHead([8], [6], num_classes=1)


def _random_targets(n: int, size: int, gen: torch.Generator, num_classes: int) -> list[dict]:
    targets = []
    for i in range(n):
        g = 0 if i == 1 else int(torch.randint(1, 6, (), generator=gen))  # image 1 is empty
        xy = torch.rand(g, 2, generator=gen) * size * 0.7
        wh = torch.rand(g, 2, generator=gen) * size * 0.4 + 8
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        labels = torch.randint(1, num_classes, (g,), generator=gen)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def _tv_ssd(num_classes: int, size: int = 320) -> SSD:
    backbone = torch.nn.Conv2d(3, 8, 1)
    backbone.out_channels = [8] * 6
    anchor_gen = TVDefaultBoxGenerator(RATIOS, min_ratio=0.2, max_ratio=0.95)
    head = SSDLiteHead([8] * 6, [6] * 6, num_classes)
    return SSD(backbone, anchor_gen, (size, size), num_classes, head=head)


def test_matching_and_loss_equal_torchvision() -> None:
    gen = torch.Generator().manual_seed(3)
    size, c = 320, 7
    anchors = DefaultBoxGenerator(RATIOS)(_grids(size, size), (size, size))
    targets = _random_targets(4, size, gen, c)
    cls_logits = torch.randn(4, anchors.shape[0], c, generator=gen)
    bbox_reg = torch.randn(4, anchors.shape[0], 4, generator=gen)
    tv = _tv_ssd(c)
    matched = []
    for t in targets:
        if t["boxes"].numel() == 0:
            matched.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64))
        else:
            matched.append(tv.proposal_matcher(box_iou(t["boxes"], anchors)))
    from heads.ssdlite import _pad_targets

    boxes, _, valid = _pad_targets(targets, bbox_reg)
    assert torch.equal(match_anchors(boxes, valid, anchors), torch.stack(matched))
    expected = tv.compute_loss(
        targets, {"cls_logits": cls_logits, "bbox_regression": bbox_reg}, [anchors] * 4, matched
    )
    ours = multibox_loss(cls_logits, bbox_reg, anchors, targets, BoxCoder((10.0, 10.0, 5.0, 5.0)))
    for key in ("bbox_regression", "classification"):
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-6)


def test_loss_all_empty_targets_is_background_only() -> None:
    anchors = DefaultBoxGenerator(RATIOS)(_grids(320, 320), (320, 320))
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    logits = torch.randn(2, anchors.shape[0], 3, requires_grad=True)
    losses = multibox_loss(
        logits, torch.randn(2, anchors.shape[0], 4), anchors, empty, BoxCoder((10, 10, 5, 5))
    )
    assert losses["bbox_regression"] == 0 and losses["classification"] == 0  # 0 negatives mined
    losses["classification"].backward()


def test_postprocess_equals_torchvision() -> None:
    gen = torch.Generator().manual_seed(1)
    size, c, n = 320, 11, 3
    anchors = DefaultBoxGenerator(RATIOS)(_grids(size, size), (size, size))
    cls_logits = torch.randn(n, anchors.shape[0], c, generator=gen) * 2
    bbox_reg = torch.randn(n, anchors.shape[0], 4, generator=gen)
    tv = _tv_ssd(c)
    tv.topk_candidates = 100
    tv.detections_per_img = 150
    expected = tv.postprocess_detections(
        {"cls_logits": cls_logits, "bbox_regression": bbox_reg}, [anchors] * n, [(size, size)] * n
    )
    ours = postprocess_detections(
        cls_logits,
        bbox_reg,
        anchors,
        (size, size),
        BoxCoder((10.0, 10.0, 5.0, 5.0)),
        score_thresh=tv.score_thresh,
        nms_thresh=tv.nms_thresh,
        topk_candidates=100,
        detections_per_img=150,
    )
    for e, o in zip(expected, ours, strict=True):
        assert len(o["boxes"]) == len(e["boxes"]) == 150
        assert torch.equal(o["labels"], e["labels"])
        assert torch.equal(o["scores"], e["scores"])
        assert torch.equal(o["boxes"], e["boxes"])


def test_postprocess_high_threshold_gives_empty_results() -> None:
    anchors = DefaultBoxGenerator(RATIOS)(_grids(320, 320), (320, 320))
    logits = torch.zeros(2, anchors.shape[0], 4)
    logits[..., 0] = 10  # everything is background
    out = postprocess_detections(
        logits,
        torch.zeros(2, anchors.shape[0], 4),
        anchors,
        (320, 320),
        BoxCoder((10, 10, 5, 5)),
        score_thresh=0.5,
    )
    assert [len(d["boxes"]) for d in out] == [0, 0]
    assert out[0]["boxes"].shape == (0, 4) and out[0]["labels"].dtype == torch.int64
