"""A degenerate target box given straight to ``mnv3det.ssdlite`` in train mode is an error naming
the box and the target (as torchvision's SSD), not a NaN/inf loss."""

from __future__ import annotations

import pytest
import torch

import mnv3det
from mnv3det.models.ssdlite import InvalidTargetError

GOOD = [5.0, 8.0, 60.0, 70.0]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return mnv3det.ssdlite("small", num_classes=3, size=96, width_mult=0.5).train()


def _target(*boxes: list[float]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64)}


@pytest.mark.parametrize(
    "bad",
    [
        [30.0, 20.0, 30.0, 50.0],  # x2 == x1: zero width
        [30.0, 20.0, 10.0, 50.0],  # x2 < x1
        [30.0, 50.0, 60.0, 50.0],  # y2 == y1: zero height
        [30.0, 50.0, 60.0, 40.0],  # y2 < y1
        [30.0, float("nan"), 60.0, 40.0],  # NaN coordinate
    ],
)
def test_degenerate_box_is_an_error_naming_box_and_target(model, bad: list[float]) -> None:
    images = [torch.rand(3, 96, 96), torch.rand(3, 96, 96)]
    with torch.no_grad(), pytest.raises(InvalidTargetError) as raised:
        model(images, [_target(GOOD), _target(GOOD, bad)])
    message = str(raised.value)
    assert "should have positive height and width" in message
    assert "for target at index 1" in message
    assert f"Found invalid box {torch.tensor(bad).tolist()}" in message


def test_valid_boxes_still_give_a_finite_loss(model) -> None:
    with torch.no_grad():
        losses = model(
            [torch.rand(3, 96, 96), torch.rand(3, 96, 96)],
            [_target(GOOD), _target(GOOD, [30.0, 20.0, 31.0, 21.0])],  # a 1x1 box is valid
        )
    assert all(torch.isfinite(v) for v in losses.values())
