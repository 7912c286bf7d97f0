"""Tensor-in, tensor-out wrappers of the two models, for ONNX export (paper §6.3-§6.4, §7).

The training-time models return what torchvision's conventions ask for: SSDLite a *list* of
per-image dicts of variable length. An ONNX graph wants fixed-rank tensors in and out, so these
modules call the models' own methods in a form ``torch.onnx.export(dynamo=True)`` traces; they
hold no layer, normalisation or box arithmetic of their own:

* :class:`SSDLiteDeploy`: ``images (N, 3, H, W)`` floats in ``[0, 1]`` (any H, W; resized to the
  model's input size inside the graph) -> ``boxes (N, D, 4)`` xyxy in the input image's pixels,
  ``scores (N, D)``, ``labels (N, D)`` int64, ``num_detections (N,)``; ``D =
  detections_per_img``, rows past ``num_detections`` are padding (score 0, label 0, box 0).
  It is :meth:`SSDLite.transform <mnv3det.models.ssdlite.SSDLite.transform>`,
  :meth:`~mnv3det.models.ssdlite.SSDLite.head_outputs` and
  :meth:`~mnv3det.models.ssdlite.SSDLite.postprocess_dense` (the eager model's dense
  post-processing, whose NMS :func:`mnv3det.deploy.onnx.onnx_translation_table` exports as ONNX
  ``NonMaxSuppression``).
* :class:`SegmenterDeploy`: ``images (N, 3, H, W)`` in ``[0, 1]`` -> LR-ASPP logits; the
  normalisation is part of the graph, so a deployed model takes raw pixels / 255.

Both work in eager PyTorch too (same outputs), which is what the tests compare against the
PyTorch models and against onnxruntime.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.ssdlite_postprocess import dense_to_list
from mnv3det.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SSDLiteDeploy", "SegmenterDeploy", "dense_to_list"]


class SSDLiteDeploy(nn.Module):
    """SSDLite with pre-processing, box decoding and NMS in one traceable graph.

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
        self.overrides = {
            "score_thresh": score_thresh,
            "nms_thresh": nms_thresh,
            "topk_candidates": topk_candidates,
            "detections_per_img": detections_per_img,
        }
        with torch.no_grad():  # the default boxes of the fixed network input size, computed
            # (and cached by the model's generator) outside the exporter's tracing
            model.head_outputs(model.transform(torch.zeros(1, 3, *model.size)))

    def network(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-processing and layers: ``(cls_logits, bbox_regression)`` (no post-processing)."""
        outputs, _ = self.model.head_outputs(self.model.transform(images))
        return outputs["cls_logits"], outputs["bbox_regression"]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detect objects in a batch of same-size images.

        Args:
            images: ``(N, 3, H, W)`` floats in ``[0, 1]``.

        Returns:
            ``(boxes (N, D, 4), scores (N, D), labels (N, D) int64, num_detections (N,))``; rows of
            each image are sorted by decreasing score, valid rows first.
        """
        outputs, anchors = self.model.head_outputs(self.model.transform(images))
        h, w = images.shape[-2:]
        hw = torch.stack(
            (torch.tensor(h, dtype=torch.float32), torch.tensor(w, dtype=torch.float32))
        )
        return self.model.postprocess_dense(
            outputs, anchors, self.model.box_scale(hw), **self.overrides
        )


class SegmenterDeploy(nn.Module):
    """A segmentation model as ``images in [0, 1] -> logits (N, C, H, W)``.

    :class:`mnv3det.models.lraspp.LRASPP` takes ``[0, 1]`` images and normalises them itself
    (its ``normalize``); it is called as it is. A model without that (torchvision's LR-ASPP
    takes normalised images) gets ``mean``/``std`` applied first.

    With ``low_res=True`` it returns the classifier's stride-8 logits instead (no final
    upsampling): a deployment that wants the label map computes it from them with
    :func:`heads.label_map.bilinear_argmax` (what :class:`mnv3det.deploy.onnx.OnnxSegmenter`
    does for such a file), far cheaper than upsampling every class to full size first.

    Args:
        model: e.g. :class:`mnv3det.models.lraspp.LRASPP` (returns a logits tensor) or
            torchvision's LR-ASPP (returns ``{"out": logits}``; ``"out"`` is taken).
        mean: per-channel normalisation mean for a model that does not normalise (ImageNet).
        std: per-channel normalisation std for such a model.
        low_res: return the logits before the final upsampling (``(N, C, ceil(H/8),
            ceil(W/8))`` for LR-ASPP's output stride 8).
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        low_res: bool = False,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.low_res = low_res
        owns_input = isinstance(getattr(model, "normalize", None), Normalize)
        self.normalize = nn.Identity() if owns_input else Normalize(mean, std)

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the input resolution (or stride 8, ``low_res``) for ``images (N, 3, H,
        W)`` in ``[0, 1]``."""
        if self.low_res:  # ours: features() normalises; torchvision's: backbone + our Normalize
            features = getattr(self.model, "features", None)
            if callable(features):
                return self.model.classifier(features(images))
            return self.model.classifier(self.model.backbone(self.normalize(images)))["out"]
        out = self.model(self.normalize(images))
        return out["out"] if isinstance(out, dict) else out
