"""The backbone with an FPN drops into torchvision's FasterRCNN, RetinaNet and FCOS unchanged."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

import mnv3det

FASTER_TAPS = ["stage2", "stage3", "stage4", "last_conv"]
P3_P7_TAPS = ["stage3", "stage4", "last_conv"]


def _images_and_targets() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 160, generator=gen), torch.rand(3, 96, 128, generator=gen)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0], [50.0, 30.0, 120.0, 90.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    return images, targets


def _build(kind: str) -> torch.nn.Module:
    small = {"min_size": 128, "max_size": 160}
    if kind == "fasterrcnn":
        backbone = mnv3det.with_fpn(mnv3det.mobilenet_v3("large", taps=FASTER_TAPS), 64)
        return FasterRCNN(backbone, num_classes=3, **small)
    backbone = mnv3det.with_fpn(
        mnv3det.mobilenet_v3("large", taps=P3_P7_TAPS), 64, extra_blocks="p6p7"
    )
    detector = RetinaNet if kind == "retinanet" else FCOS
    return detector(backbone, num_classes=3, **small)


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet", "fcos"])
def test_torchvision_detector_trains_and_evaluates(kind: str) -> None:
    model = _build(kind)
    images, targets = _images_and_targets()
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    stem_grad = model.backbone.body.features[0][0].weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0  # gradients reach the backbone
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det in detections:
        assert set(det) >= {"boxes", "scores", "labels"}
        assert det["boxes"].shape[-1] == 4


def test_fpn_output_names_channels_and_strides() -> None:
    fpn = mnv3det.with_fpn(mnv3det.mobilenet_v3("small", taps=FASTER_TAPS), out_channels=32)
    out = fpn(torch.randn(1, 3, 128, 128))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert fpn.out_channels == 32
    assert [v.shape[-1] for v in out.values()] == [32, 16, 8, 4, 2]
    assert all(v.shape[1] == 32 for v in out.values())


def test_with_fpn_rejects_unknown_extra_block() -> None:
    with pytest.raises(ValueError, match="extra_blocks must be"):
        mnv3det.with_fpn(mnv3det.mobilenet_v3("small"), extra_blocks="p6")
