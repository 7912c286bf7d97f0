"""heads.nms.nms_keep_mask: per-group NMS as a keep mask, equal to torchvision's batched_nms
on every eager path (one shifted NMS call, and per-row calls on one or several threads)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from heads import nms as nms_module
from heads.nms import nms_keep_mask


def _groups(g: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(g, k, 2, generator=gen) * 200
    boxes = torch.cat([xy, xy + torch.rand(g, k, 2, generator=gen) * 80 + 1], dim=-1)
    boxes[0, 3] = boxes[0, 3, :2].repeat(2)  # a zero-area box
    scores = torch.rand(g, k, generator=gen)
    lengths = torch.randint(0, k + 1, (g,), generator=gen)  # some rows empty, some full
    lengths[1] = k
    scores = scores.masked_fill(torch.arange(k) >= lengths[:, None], -1.0)
    return boxes, scores


def _reference(boxes, scores, iou, score_threshold):
    """torchvision.ops.batched_nms with one group per row, as a mask."""
    g, k = scores.shape
    flat = (scores.flatten() > score_threshold).nonzero().flatten()
    groups = torch.arange(g).repeat_interleave(k)[flat]
    kept = batched_nms(boxes.reshape(-1, 4)[flat], scores.flatten()[flat], groups, iou)
    mask = torch.zeros(g * k, dtype=torch.bool)
    mask[flat[kept]] = True
    return mask.view(g, k)


@pytest.mark.parametrize("iou", [0.3, 0.55])
@pytest.mark.parametrize(
    ("single_pass_max", "threads"),
    [(10**9, 2), (0, 1), (0, 2)],
    ids=["one-call", "per-row", "per-row-2-threads"],
)
def test_nms_keep_mask_equals_batched_nms(monkeypatch, iou, single_pass_max, threads):
    monkeypatch.setattr(nms_module, "SINGLE_PASS_MAX_BOXES", single_pass_max)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        boxes, scores = _groups(40, 60)
        keep = nms_keep_mask(boxes, scores, iou, 0.3)
    finally:
        torch.set_num_threads(previous)
    expected = _reference(boxes, scores, iou, 0.3)
    assert keep.dtype == torch.bool and keep.shape == (40, 60)
    assert torch.equal(keep, expected)
    assert 0 < int(keep.sum()) < int((scores > 0.3).sum())  # something was suppressed
    assert not keep[scores <= 0.3].any()


def test_nms_keep_mask_no_candidates():
    keep = nms_keep_mask(torch.zeros(3, 4, 4), torch.full((3, 4), -1.0), 0.5, 0.0)
    assert keep.shape == (3, 4) and not keep.any()


def test_nms_keep_mask_rows_do_not_suppress_each_other():
    box = torch.tensor([0.0, 0.0, 10.0, 10.0])
    boxes = box.expand(5, 2, 4).clone()  # the same box twice in every row
    keep = nms_keep_mask(boxes, torch.tensor([[0.9, 0.8]]).expand(5, 2).contiguous(), 0.5, 0.0)
    assert keep[:, 0].all() and not keep[:, 1].any()
