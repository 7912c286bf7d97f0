"""mnv3det.ssdlite: any input size, variants, train/eval conventions, clear errors."""

from __future__ import annotations

import pytest
import torch

import mnv3det
from mnv3det.models.ssdlite import InvalidTargetError


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _targets(n: int) -> list[dict]:
    return [
        {"boxes": torch.tensor([[5.0, 8.0, 60.0, 70.0], [30.0, 20.0, 90.0, 50.0]]),
         "labels": torch.tensor([1, 2])}
        for _ in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize(("size", "grids"), [(320, [20, 10, 5, 3, 2, 1]), (512, [32, 16, 8, 4, 2, 1]),
                                             (640, [40, 20, 10, 5, 3, 2])])  # fmt: skip
def test_any_input_size_default_boxes_follow_feature_maps(size: int, grids: list[int]) -> None:
    model = mnv3det.ssdlite("small", num_classes=4, size=size, width_mult=0.5).eval()
    batch, _, _ = model.preprocess([torch.rand(3, 100, 140)])
    assert batch.shape[-2:] == (size, size)
    outputs, anchors = model.head_outputs(batch)
    assert anchors.shape[0] == sum(6 * g * g for g in grids) == outputs["cls_logits"].shape[1]
    assert (anchors[:, 2] - anchors[:, 0]).max() == pytest.approx(size)  # largest box = the input
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert centres.min() > 0 and centres.max() < size
    with torch.no_grad():
        dets = model([torch.rand(3, 100, 140), torch.rand(3, 77, 50)])
    for det, (h, w) in zip(dets, [(100, 140), (77, 50)], strict=True):
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) <= 300
        assert det["boxes"][:, 2].max() <= w + 1e-3 and det["boxes"][:, 3].max() <= h + 1e-3
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # sorted


def test_non_square_size() -> None:
    model = mnv3det.ssdlite("small", num_classes=3, size=(256, 384), width_mult=0.5).eval()
    outputs, anchors = model.head_outputs(torch.zeros(1, 3, 256, 384))
    assert (
        outputs["bbox_regression"].shape[1]
        == anchors.shape[0]
        == 6 * (16 * 24 + 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1 * 1)
    )
    assert (anchors[:, 2] - anchors[:, 0]).max() == pytest.approx(
        384
    )  # sizes are fractions of W ...
    assert (anchors[:, 3] - anchors[:, 1]).max() == pytest.approx(256)  # ... and of H


@pytest.mark.parametrize(
    ("arch", "width", "tail", "params"),
    [("large", 1.0, True, 3_440_060), ("large", 1.0, False, None), ("small", 0.75, True, None)],
)
def test_variants_build_and_train(arch: str, width: float, tail: bool, params: int | None) -> None:
    model = mnv3det.ssdlite(arch, num_classes=91, width_mult=width, reduced_tail=tail, size=160)
    if params is not None:  # torchvision's ssdlite320_mobilenet_v3_large
        assert sum(p.numel() for p in model.parameters()) == params
    c4, c5 = model.backbone.feature_info
    assert (c4.name, c4.stride, c5.name, c5.stride) == ("stage5_expand", 16, "last_conv", 32)
    model.train()
    losses = model([torch.rand(3, 160, 160), torch.rand(3, 120, 200)], _targets(2))
    assert set(losses) == {"bbox_regression", "classification"}
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert model.head.classification_head.module_list[0][1].weight.grad is not None


def test_train_accepts_empty_targets_and_batched_tensor() -> None:
    model = mnv3det.ssdlite("small", num_classes=3, size=128, width_mult=0.5).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(torch.rand(2, 3, 128, 128), [empty, _targets(1)[0]])
    assert losses["bbox_regression"] > 0


def test_target_boxes_are_rescaled_with_the_image() -> None:
    """Boxes given in original pixels are scaled like the image (x by 128/256, y by 128/64)."""
    model = mnv3det.ssdlite("small", num_classes=3, size=128, width_mult=0.5).eval()
    image = torch.rand(3, 64, 256)
    target = {"boxes": torch.tensor([[32.0, 16.0, 160.0, 48.0]]), "labels": torch.tensor([1])}
    batch, _, resized = model.preprocess([image], [target])
    assert batch.shape == (1, 3, 128, 128)
    torch.testing.assert_close(resized[0]["boxes"], torch.tensor([[16.0, 32.0, 80.0, 96.0]]))


def test_clear_errors() -> None:
    model = mnv3det.ssdlite("small", num_classes=3, size=128, width_mult=0.5)
    model.train()
    with pytest.raises(InvalidTargetError, match="targets are required"):
        model([torch.rand(3, 64, 64)])
    with pytest.raises(InvalidTargetError, match=r"labels outside 1\.\.2"):
        model(
            [torch.rand(3, 64, 64)],
            [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([3])}],
        )
    with pytest.raises(InvalidTargetError, match="'boxes' must be a float"):
        model(
            [torch.rand(3, 64, 64)],
            [{"boxes": torch.tensor([1.0, 1, 9, 9]), "labels": torch.tensor([1])}],
        )
    model.eval()
    with pytest.raises(ValueError, match=r"must be a \(3, H, W\) tensor"):
        model([torch.rand(1, 64, 64)])
    with pytest.raises(TypeError, match="floats in"):
        model([torch.zeros(3, 64, 64, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="at least 32"):
        mnv3det.ssdlite("small", size=16)
