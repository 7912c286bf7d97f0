"""Confusion-matrix mIoU (Cityscapes definition) against torchmetrics and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from mnv3det.data.cityscapes_labels import CLASS_NAMES
from mnv3det.metrics.segmentation import SegmentationMetrics, format_iou_table


def _batches(seed: int = 0, n: int = 4):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        target = torch.randint(0, 12, (2, 40, 56), generator=gen)  # classes 12..18 absent
        target[:, :5] = 255  # an ignored band
        target[torch.rand(target.shape, generator=gen) < 0.1] = 255
        # Mostly correct predictions with noise from classes 0..11 and the absent class 15.
        noise = torch.randint(0, 13, target.shape, generator=gen)
        noise[noise == 12] = 15
        preds = torch.where(torch.rand(target.shape, generator=gen) < 0.7, target, noise)
        preds[target == 255] = torch.randint(0, 19, (int((target == 255).sum()),), generator=gen)
        yield preds, target


def test_agrees_with_torchmetrics_jaccard_over_several_batches():
    ours = SegmentationMetrics(num_classes=19)
    theirs = MulticlassJaccardIndex(num_classes=19, ignore_index=255, average=None)
    theirs_macro = MulticlassJaccardIndex(num_classes=19, ignore_index=255, average="macro")
    acc = MulticlassAccuracy(num_classes=19, ignore_index=255, average="micro")
    for preds, target in _batches():
        logits = torch.nn.functional.one_hot(preds, 19).permute(0, 3, 1, 2).float()
        ours.update(logits, target)  # logits path (argmax)
        theirs.update(preds, target)
        theirs_macro.update(preds, target)
        acc.update(preds, target)
    res = ours.compute()
    reference = theirs.compute()
    present = ~torch.isnan(res["iou"])
    # classes 12, 13, 14, 16, 17, 18: never in the target, never predicted -> NaN here, 0 there.
    assert present.sum() == 13
    torch.testing.assert_close(res["iou"][present], reference[present])
    assert (reference[~present] == 0).all()
    torch.testing.assert_close(res["iou"][15], torch.tensor(0.0))  # predicted, never true
    torch.testing.assert_close(res["miou"], theirs_macro.compute())
    torch.testing.assert_close(res["miou_all"], reference.mean())
    torch.testing.assert_close(res["pixel_acc"], acc.compute())


def test_hand_computed_example_and_ignore():
    target = torch.tensor([[0, 0, 1, 1, 255, 255]])
    preds = torch.tensor([[0, 1, 1, 1, 0, 2]])
    metric = SegmentationMetrics(num_classes=3, class_names=["a", "b", "c"])
    metric.update(preds, target)
    res = metric.compute()
    # class 0: tp 1, fp 0, fn 1 -> 1/2; class 1: tp 2, fp 1 -> 2/3; class 2: absent -> NaN.
    assert res["iou"][0].item() == pytest.approx(0.5)
    assert res["iou"][1].item() == pytest.approx(2 / 3)
    assert math.isnan(res["iou"][2].item())
    assert res["miou"].item() == pytest.approx((0.5 + 2 / 3) / 2)
    assert res["miou_all"].item() == pytest.approx((0.5 + 2 / 3) / 3)
    assert res["pixel_acc"].item() == pytest.approx(3 / 4)
    assert metric.confmat.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_accumulates_not_averages_per_image():
    metric = SegmentationMetrics(num_classes=2, class_names=["x", "y"])
    metric.update(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1]]))  # per-image 0.75/0
    metric.update(torch.tensor([[1]]), torch.tensor([[1]]))  # per-image -/1.0
    res = metric.compute()
    assert res["iou"].tolist() == pytest.approx([3 / 4, 1 / 2])
    metric.reset()
    assert metric.confmat.sum() == 0


def test_bad_inputs_are_clear_errors():
    metric = SegmentationMetrics(num_classes=19)
    with pytest.raises(ValueError, match=r"target values \[20\]"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 20))
    with pytest.raises(ValueError, match="channels"):
        metric.update(torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        metric.update(
            torch.zeros(1, 3, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="class_names"):
        SegmentationMetrics(num_classes=3, class_names=["a"])


def test_table_has_cityscapes_names_and_marks_absent_classes():
    metric = SegmentationMetrics(num_classes=19)
    for preds, target in _batches(n=1):
        metric.update(preds, target)
    text = format_iou_table(metric.compute(), CLASS_NAMES, metric.confmat)
    lines = text.splitlines()
    for name in CLASS_NAMES:
        assert any(line.startswith(name + " ") for line in lines)
    assert "n/a" in next(line for line in lines if line.startswith("bicycle"))
    assert "mIoU (13 present)" in text and "mIoU (all 19)" in text and "pixel accuracy" in text
    assert metric.table() == text
