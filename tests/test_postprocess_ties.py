"""Exactly equal scores: our dense post-processing picks and orders them as torchvision does.

Class logits that are the same at every anchor (zero class-conv weights, equal biases) give
every (anchor, class) the same score, so every choice (the 300 candidates of a class, which of two overlapping boxes NMS keeps, the 300
detections of an image) is a choice among ties. :mod:`heads.ssdlite_postprocess` makes these
choices with the same ``topk`` / ``sort`` calls on the same tensors as torchvision, so the
detections are the same set, also on the fast path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from mnv3det.deploy import FastSSDLite
from mnv3det.models.from_checkpoint import load_model


def _key(det: dict) -> list[tuple]:
    """The detections as a set-like sorted list (order within equal scores is arbitrary)."""
    rows = zip(
        det["scores"].tolist(), det["labels"].tolist(), det["boxes"].round(decimals=2).tolist()
    )
    return sorted((round(s, 7), lab, tuple(b)) for s, lab, b in rows)


def _tied_torchvision(partial_rows: bool) -> nn.Module:
    torch.manual_seed(0)
    tv = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        for layer in tv.head.classification_head.module_list:
            conv = layer[-1] if isinstance(layer, nn.Sequential) else layer
            conv.weight.zero_()  # class logits = bias: the same at every anchor (all tied)
            bias = torch.zeros_like(conv.bias).view(-1, 91)
            if partial_rows:  # some anchor types below the score threshold, others tied above
                bias[::2, 1:] = -20.0
            conv.bias.copy_(bias.view(-1))
    return tv


@pytest.mark.parametrize("partial_rows", [False, True])
def test_tied_scores_same_detections_as_torchvision(partial_rows: bool) -> None:
    tv = _tied_torchvision(partial_rows)
    ours = load_model(tv.state_dict(), builder="ssdlite").eval()
    images = torch.rand(2, 3, 240, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tv(list(images))
        eager = ours(images)
        fast = FastSSDLite(ours)(images)
    for e, o, f in zip(expected, eager, fast, strict=True):
        scores = e["scores"]
        assert len(scores) == 300 and int((scores[1:] == scores[:-1]).sum()) > 100  # ties
        assert _key(o) == _key(e)
        assert _key(f) == _key(e)
