"""Fast PyTorch inference: conv+BN folding, channels_last and the dense SSDLite post-processing
give the same outputs as the unfused models (detections identical, logits within 1e-4)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import randomize_bn_stats

import mnv3det
from mnv3det.deploy import wrappers as deploy
from mnv3det.deploy.fast import FastSSDLite, count_batch_norms, optimize_for_inference
from mnv3det.deploy.wrappers import SegmenterDeploy, SSDLiteDeploy


def spread_head(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random prediction-layer weights/biases: an untrained SSDLite gives many exactly tied
    scores (cells with saturated features), whose order is arbitrary; this keeps them apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.head.modules():
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.3)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.5)
    return model


def small_ssdlite(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = mnv3det.ssdlite("large", num_classes=5, size=128, width_mult=0.5, **kwargs)
    return spread_head(randomize_bn_stats(model)).eval()


def assert_same_detections(a: dict, b: dict, box_tol: float = 1e-3, score_tol: float = 1e-5):
    """The two detection sets are equal up to order: a one-to-one matching exists between
    detections with the same label, scores within ``score_tol`` and boxes within ``box_tol``
    (order among equal scores is arbitrary in both torchvision and onnxruntime)."""
    assert len(a["scores"]) == len(b["scores"]), (len(a["scores"]), len(b["scores"]))
    sa, sb = torch.as_tensor(a["scores"]).double(), torch.as_tensor(b["scores"]).double()
    ba, bb = torch.as_tensor(a["boxes"]).double(), torch.as_tensor(b["boxes"]).double()
    la, lb = torch.as_tensor(a["labels"]), torch.as_tensor(b["labels"])
    close = (
        (la[:, None] == lb[None, :])
        & ((sa[:, None] - sb[None, :]).abs() <= score_tol)
        & ((ba[:, None, :] - bb[None, :, :]).abs().amax(-1) <= box_tol)
    )
    used = torch.zeros(len(sb), dtype=torch.bool)
    for row in range(len(sa)):  # greedy one-to-one matching
        free = (close[row] & ~used).nonzero()
        assert len(free), (
            f"detection {row} (label {int(la[row])}, score {float(sa[row]):.6f}) unmatched"
        )
        used[free[0, 0]] = True


# ----------------------------------------------------------------------------- LR-ASPP
@pytest.mark.parametrize("channels_last", [False, True])
def test_lraspp_fused_logits_match(channels_last):
    torch.manual_seed(0)
    model = randomize_bn_stats(mnv3det.lraspp("large", num_classes=19, width_mult=0.5)).eval()
    fast = optimize_for_inference(model, channels_last=channels_last)
    assert count_batch_norms(fast) == 0 and count_batch_norms(model) > 0
    images = torch.randn(2, 3, 72, 104)
    with torch.no_grad():
        ref = model(images)
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        out = fast(x)
    assert out.shape == ref.shape == (2, 19, 72, 104)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_segmenter_deploy_normalises_once():
    torch.manual_seed(0)
    model = randomize_bn_stats(mnv3det.lraspp("small", num_classes=3, width_mult=0.5)).eval()
    images = torch.rand(1, 3, 64, 64)
    mean = torch.tensor(deploy.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(deploy.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        # ours normalises its [0, 1] input itself: the wrapper adds nothing
        torch.testing.assert_close(SegmenterDeploy(model)(images), model(images))

        class Normalised(torch.nn.Module):  # a model taking normalised input (torchvision's)
            def forward(self, x):
                return {
                    "out": model.classifier(dict(zip(("low", "high"), model.backbone(x).values())))
                }

        wrapped = SegmenterDeploy(Normalised())(images)
        direct = Normalised()((images - mean) / std)["out"]
        torch.testing.assert_close(wrapped, direct)


# ----------------------------------------------------------------------------- SSDLite
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_ssdlite_same_detections_batched(channels_last):
    model = small_ssdlite()
    fast = FastSSDLite(model, channels_last=channels_last)
    assert count_batch_norms(fast) == 0
    images = torch.rand(3, 3, 100, 140, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(images)
        out = fast(images)
    assert len(out) == 3
    for a, b in zip(ref, out, strict=True):
        assert len(a["scores"]) > 0
        assert_same_detections(a, b)
        assert torch.all(b["scores"][:-1] >= b["scores"][1:])  # sorted like torchvision


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile's CPU backend needs a C++ compiler",
)
def test_fast_ssdlite_compiled_same_detections():
    """``compile=True`` (Inductor, freezing): the same detections as the eager model."""
    model = small_ssdlite()
    fast = FastSSDLite(model, channels_last=True, compile=True)
    images = torch.rand(2, 3, 100, 140, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(images)
        out = fast(images)
    for a, b in zip(ref, out, strict=True):
        assert len(a["scores"]) > 0
        assert_same_detections(a, b)


def test_fast_ssdlite_mixed_sizes_and_thresholds():
    model = small_ssdlite(score_thresh=0.2, detections_per_img=20)
    fast = FastSSDLite(model)
    gen = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 90, 120, generator=gen), torch.rand(3, 128, 128, generator=gen)]
    with torch.no_grad():
        ref = model(images)
        out = fast(images)
    for a, b in zip(ref, out, strict=True):
        assert 0 < len(b["scores"]) <= 20
        assert bool((b["scores"] > 0.2).all())
        assert_same_detections(a, b)


def test_ssdlite_deploy_dense_outputs_pad_and_count():
    model = small_ssdlite(score_thresh=0.3, detections_per_img=50)
    dep = SSDLiteDeploy(model)
    with torch.no_grad():
        boxes, scores, labels, num = dep(torch.rand(2, 3, 128, 128))
    assert boxes.shape == (2, 50, 4) and scores.shape == labels.shape == (2, 50)
    for i in range(2):
        n = int(num[i])
        assert bool((scores[i, :n] > 0.3).all()) and bool((labels[i, :n] >= 1).all())
        assert bool((scores[i, n:] == 0).all()) and bool((labels[i, n:] == 0).all())
        assert bool((boxes[i, n:] == 0).all())
