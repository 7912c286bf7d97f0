"""Export-friendly end-to-end graphs for deployment (MobileNetV3 paper §6.3-§6.4, §7 "latency").

The training-time models return what torchvision's conventions ask for: SSDLite a *list* of
per-image dicts of variable length (data-dependent shapes, Python-level splitting), LR-ASPP logits
of already-normalised images. An ONNX graph wants fixed-rank tensors in and out, so this module
wraps both models into modules whose whole pre- and post-processing is tensor code that
``torch.onnx.export(dynamo=True)`` traces:

* :class:`SSDLiteDeploy`: ``images (N, 3, H, W)`` floats in ``[0, 1]`` (any H, W; resized to the
  model's input size inside the graph) -> ``boxes (N, D, 4)`` xyxy in the input image's pixels,
  ``scores (N, D)``, ``labels (N, D)`` int64, ``num_detections (N,)``; ``D =
  detections_per_img``, rows past ``num_detections`` are padding (score 0, label 0, box 0).
  The post-processing is the eager model's own, :func:`heads.ssdlite_postprocess.dense_postprocess`
  (torchvision's, on fixed-shape tensors); its NMS, the custom op
  :func:`heads.nms.nms_keep_mask` (a *mask* of the kept candidates), is exported as ONNX
  ``NonMaxSuppression`` with one "batch" per (image, class), which onnxruntime runs natively
  (:func:`onnx_translation_table`).
* :class:`SegmenterDeploy`: ``images (N, 3, H, W)`` in ``[0, 1]`` -> LR-ASPP logits; the
  ImageNet normalisation is part of the graph, so a deployed model takes raw pixels / 255.

Both work in eager PyTorch too (same outputs), which is what the tests compare against the
PyTorch models and against onnxruntime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.nms import nms_keep_mask
from heads.ssdlite_postprocess import dense_postprocess, dense_to_list

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FastSSDLite",
    "SSDLiteDeploy",
    "SegmenterDeploy",
    "dense_to_list",
    "nms_keep_mask",
    "onnx_translation_table",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- NMS op
def _nms_keep_mask_onnx(boxes, scores, iou_threshold: float, score_threshold: float):
    """ONNX translation of :func:`nms_keep_mask` (onnxscript, opset 18).

    ``NonMaxSuppression`` with boxes ``(B, K, 4)`` and scores ``(B, 1, K)``: onnxruntime treats
    each row as its own batch entry, so this is per-(image, class) NMS without coordinate
    tricks. Its ``(M, 3)`` selected indices are scattered into a ``(B, K)`` mask.
    """
    from onnxscript import opset18 as op

    k = op.Shape(scores, start=1, end=2)
    selected = op.NonMaxSuppression(
        boxes,
        op.Unsqueeze(scores, [1]),
        k,
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
    )
    index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # (M, 2) row, box
    ones = op.Expand(op.Constant(value_floats=[1.0]), op.Shape(selected, start=0, end=1))
    mask = op.ScatterND(op.ConstantOfShape(op.Shape(scores)), index, ones)
    return op.Cast(mask, to=9)  # 9 = BOOL


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export`` covering this module's ops."""
    return {torch.ops.mnv3det.nms_keep_mask.default: _nms_keep_mask_onnx}


# ----------------------------------------------------------------------------- SSDLite
class SSDLiteDeploy(nn.Module):
    """SSDLite with pre-processing, box decoding and NMS in one traceable graph.

    Reuses the detector's own layers (``backbone``, ``extra``, ``head``), default boxes and box
    coder weights; thresholds default to the detector's (``score_thresh``, ``nms_thresh``,
    ``topk_candidates``, ``detections_per_img``).

    Args:
        model: an :class:`mnv3det.models.ssdlite.SSDLite` (fused or not; it is put in eval mode).
        score_thresh: override the model's minimum score.
        nms_thresh: override the model's NMS IoU.
        topk_candidates: override candidates per class before NMS.
        detections_per_img: override the number of output rows ``D``.
    """

    def __init__(
        self,
        model: nn.Module,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        topk_candidates: int | None = None,
        detections_per_img: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.size = tuple(model.size)
        self.score_thresh = float(model.score_thresh if score_thresh is None else score_thresh)
        self.nms_thresh = float(model.nms_thresh if nms_thresh is None else nms_thresh)
        self.topk_candidates = int(topk_candidates or model.topk_candidates)
        self.detections_per_img = int(detections_per_img or model.detections_per_img)
        self.num_classes = int(model.num_classes)
        self.coder_weights = tuple(float(w) for w in model.box_coder.weights)
        mean = model.image_mean.detach().clone().view(1, 3, 1, 1)
        std = model.image_std.detach().clone().view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        with torch.no_grad():  # the default boxes of the fixed network input size
            param = next(model.parameters())
            _, anchors = model.head_outputs(param.new_zeros((1, 3, *self.size)))
        self.register_buffer("anchors", anchors.detach().clone(), persistent=False)

    def network(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise, resize to the model size and run the layers: ``(cls_logits, bbox_regression)``."""
        return self.layers(self.normalize_resize(images))

    def normalize_resize(self, images: Tensor) -> Tensor:
        """Normalise ``(N, 3, H, W)`` images in ``[0, 1]`` and resize them to the model size."""
        x = (images - self.mean) / self.std
        # Always resize (an identity at the model size): no shape-dependent branch in the graph.
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def layers(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone, extra blocks and heads on a normalised batch at the model size."""
        m = self.model
        c4, c5 = m.backbone(x).values()
        out = m.head([c4, c5, *m.extra(c5)])
        return out["cls_logits"], out["bbox_regression"]

    def postprocess(
        self, cls_logits: Tensor, bbox_regression: Tensor, scale: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Dense torchvision post-processing; see the module docstring for the outputs.

        Args:
            cls_logits: ``(N, A, C)``.
            bbox_regression: ``(N, A, 4)``.
            scale: ``(4,)`` or ``(N, 1, 4)`` factors from network-input to image pixels.
        """
        return dense_postprocess(
            cls_logits,
            bbox_regression,
            self.anchors,
            self.size,
            self.coder_weights,
            score_thresh=self.score_thresh,
            nms_thresh=self.nms_thresh,
            topk_candidates=self.topk_candidates,
            detections_per_img=self.detections_per_img,
            scale=scale,
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detect objects in a batch of same-size images.

        Args:
            images: ``(N, 3, H, W)`` floats in ``[0, 1]``.

        Returns:
            ``(boxes (N, D, 4), scores (N, D), labels (N, D), num_detections (N,))``; rows of
            each image are sorted by decreasing score, valid rows first.
        """
        cls_logits, bbox_regression = self.network(images)
        return self.postprocess(cls_logits, bbox_regression, self.box_scale(images))

    def box_scale(self, images: Tensor) -> Tensor:
        """``(4,)`` factors from network-input to ``images`` pixels (torchvision's
        ``resize_boxes``: float32 original size / resized size)."""
        h, w = images.shape[-2:]
        ratio_w = torch.tensor(w, dtype=torch.float32) / float(self.size[1])
        ratio_h = torch.tensor(h, dtype=torch.float32) / float(self.size[0])
        return torch.stack((ratio_w, ratio_h, ratio_w, ratio_h))


class FastSSDLite(nn.Module):
    """Fast PyTorch inference for SSDLite with torchvision's output format.

    BatchNorms folded into the convolutions (:func:`mnv3det.deploy.fast.optimize_for_inference`,
    optionally channels_last), batched pre-processing (one normalise + resize for a batch of
    same-size images) and the dense post-processing of :class:`SSDLiteDeploy` (no loop over
    images or classes; NMS is :func:`nms_keep_mask`). Detections equal the original model's.

    Args:
        model: an :class:`mnv3det.models.ssdlite.SSDLite` (left unchanged).
        channels_last: run the network in channels_last memory format.
        **deploy_kwargs: threshold overrides (see :class:`SSDLiteDeploy`).
    """

    def __init__(
        self, model: nn.Module, channels_last: bool = False, **deploy_kwargs: float | int | None
    ) -> None:
        super().__init__()
        from mnv3det.deploy.fast import optimize_for_inference

        self.channels_last = channels_last
        self.deploy = SSDLiteDeploy(
            optimize_for_inference(model, channels_last=channels_last), **deploy_kwargs
        )

    def preprocess(self, images: Tensor | list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(normalised batch at the model size, (N, 1, 4) box scale per image)``."""
        d = self.deploy
        if isinstance(images, Tensor) or len({tuple(im.shape) for im in images}) == 1:
            batch = images if isinstance(images, Tensor) else torch.stack(list(images))
            scale = d.box_scale(batch).expand(batch.shape[0], 1, 4)
            x = d.normalize_resize(batch)
        else:  # mixed sizes: resize each image, as torchvision's transform does
            x = torch.cat([d.normalize_resize(im[None]) for im in images])
            scale = torch.stack([d.box_scale(im) for im in images])[:, None]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, scale

    def network(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone, extra blocks and heads on a pre-processed batch."""
        return self.deploy.layers(x)

    def postprocess(
        self, cls_logits: Tensor, bbox_regression: Tensor, scale: Tensor
    ) -> list[dict[str, Tensor]]:
        """Per-image ``{"boxes", "scores", "labels"}`` (torchvision's format)."""
        return dense_to_list(*self.deploy.postprocess(cls_logits, bbox_regression, scale))

    @torch.no_grad()
    def forward(self, images: Tensor | list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections for ``(N, 3, H, W)`` or a list of ``(3, H, W)`` images in ``[0, 1]``."""
        x, scale = self.preprocess(images)
        return self.postprocess(*self.network(x), scale)


# ----------------------------------------------------------------------------- LR-ASPP
class SegmenterDeploy(nn.Module):
    """Normalisation + a segmentation model: ``images in [0, 1] -> logits (N, C, H, W)``.

    Args:
        model: e.g. :class:`mnv3det.models.lraspp.LRASPP` (returns a logits tensor) or
            torchvision's LR-ASPP (returns ``{"out": logits}``; ``"out"`` is taken).
        mean: per-channel normalisation mean (ImageNet by default, as the LR-ASPP task uses).
        std: per-channel normalisation std.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the input resolution for ``images (N, 3, H, W)`` in ``[0, 1]``."""
        out = self.model((images - self.mean) / self.std)
        return out["out"] if isinstance(out, dict) else out
