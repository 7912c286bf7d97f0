"""NMS only where it can change the output: equal detections, far fewer boxes through NMS.

:func:`heads.ssdlite_postprocess.dense_postprocess` runs NMS on each image's best-scoring
candidates only, growing the set until its ``detections_per_img`` best kept boxes are final
(:func:`heads.ssdlite_postprocess._keep_best`). These tests give torchvision's SSDLite score
distributions with many candidates per class (a trained-like one and a "heavy" one where most
of the 90 x 300 candidates pass the score threshold), compare with torchvision's full
post-processing, and check that NMS really saw fewer boxes.
"""

from __future__ import annotations

import pytest
import torch
from test_ssdlite_parity import _assert_same
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

import heads.ssdlite_postprocess as post
from heads.nms import nms_keep_mask
from mnv3det.deploy import FastSSDLite
from mnv3det.deploy.benchmark.zoo import apply_score_regime
from mnv3det.models.from_checkpoint import load_model


def _models(regime: str):
    torch.manual_seed(0)
    tv = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    image = torch.rand(1, 3, 480, 640, generator=torch.Generator().manual_seed(1))
    stats = apply_score_regime(tv, regime, image)
    return tv, load_model(tv.state_dict(), builder="ssdlite").eval(), image, stats


def _nms_sizes(monkeypatch) -> list[int]:
    """Record how many candidates each NMS call of the post-processing gets."""
    sizes: list[int] = []

    def spy(boxes, scores, iou, thresh):
        sizes.append(int((scores > thresh).sum()))
        return nms_keep_mask(boxes, scores, iou, thresh)

    monkeypatch.setattr(post, "nms_keep_mask", spy)
    return sizes


@pytest.mark.parametrize("regime", ["trained", "heavy"])
def test_same_detections_as_torchvision_with_nms_on_few_boxes(monkeypatch, regime: str) -> None:
    tv, ours, image, stats = _models(regime)
    assert stats["candidates"] > 10_000  # thousands of boxes would go through a full NMS
    sizes = _nms_sizes(monkeypatch)
    with torch.no_grad():
        expected = tv(list(image))
        eager, fast = ours(image), FastSSDLite(ours, channels_last=True)(image)
    _assert_same(expected, eager)
    _assert_same(expected, fast)
    assert len(expected[0]["scores"]) == 300
    assert sizes == [900, 900]  # eager and fast: one NMS each, on the 3 x 300 best


def test_the_set_grows_until_enough_boxes_are_kept(monkeypatch) -> None:
    tv, ours, image, _ = _models("heavy")
    tv.nms_thresh = ours.nms_thresh = 0.1  # strong suppression: few of the first 3000 kept
    tv.detections_per_img = ours.detections_per_img = 1000
    sizes = _nms_sizes(monkeypatch)
    with torch.no_grad():
        expected, got = tv(list(image)), ours(image)
    _assert_same(expected, got)
    assert len(got[0]["scores"]) == 1000
    assert len(sizes) >= 2 and sizes == sorted(sizes)  # grew at least once, never shrank
    assert sizes[0] == 3000  # started at 3 x detections_per_img


def test_dense_outputs_equal_a_full_nms(monkeypatch) -> None:
    """Against the same function with a full keep mask, on a batch of two images whose
    candidate counts differ (one image's cut-off can lie below the other's)."""
    gen = torch.Generator().manual_seed(0)
    anchors = torch.rand(500, 2, generator=gen).mul(280).repeat(1, 2) + torch.tensor([0, 0, 40, 40])
    logits = torch.randn(2, 500, 21, generator=gen) * 3
    logits[1, :, 1:] -= 4  # the second image has far fewer candidates
    codes = torch.randn(2, 500, 4, generator=gen) * 0.1
    args = (logits, codes, anchors, (320, 320), (10.0, 10.0, 5.0, 5.0))
    kwargs = {"topk_candidates": 100, "detections_per_img": 50}
    lazy = post.dense_postprocess(*args, **kwargs)

    def full(boxes, top_scores, iou, thresh, d):
        return nms_keep_mask(boxes, top_scores.reshape(-1, boxes.shape[1]), iou, thresh)

    monkeypatch.setattr(post, "_keep_best", full)
    reference = post.dense_postprocess(*args, **kwargs)
    for a, b in zip(lazy, reference, strict=True):
        assert torch.equal(a, b)
    assert lazy[3].tolist() == [50, 50]


def test_a_tie_at_the_last_place_goes_through_the_full_nms(monkeypatch) -> None:
    """Random BatchNorm statistics give many exactly equal scores (flat feature regions); a tie
    between the 300th and 301st kept box is broken by torchvision's sort of *all* kept boxes,
    so every candidate goes through NMS and the detections stay torchvision's."""
    from mnv3det.deploy.benchmark.zoo import torchvision_model

    tv = torchvision_model("ssdlite", random_bn=True)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 480, 640)
    apply_score_regime(tv, "heavy", image)
    ours = load_model(tv.state_dict(), builder="ssdlite").eval()
    sizes = _nms_sizes(monkeypatch)
    with torch.no_grad():
        expected, got = tv(list(image)), ours(image)
    _assert_same(expected, got)
    assert sizes[0] < 1500 and sizes[-1] > 20_000  # tie found on a subset, then all of them
