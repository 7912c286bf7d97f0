"""SSDLite with a MobileNetV3 backbone (paper §6.3, Table 6): ``mnv3det.ssdlite``.

The backbone's ``stage5_expand`` tap (C4: the expansion layer of the first stride-32 block, at
stride 16) and ``last_conv`` tap (C5, stride 32) feed :mod:`heads.ssdlite` (four extra blocks,
separable prediction heads, default boxes, multibox loss, batched post-processing). These taps
are fixed (``SSDLITE_TAPS``): the paper attaches SSDLite's first layer to C4 and the second to
C5, the layout torchvision's checkpoints have, so they are not a builder or config option.

torchvision's detection conventions:

* input: a list of float images ``(3, H, W)`` in ``[0, 1]``, each of any size (or one
  ``(N, 3, H, W)`` tensor). The model normalises them itself (its ``normalize``, mean = std =
  0.5, i.e. to ``[-1, 1]``; see :mod:`mnv3det.models.normalize`) and resizes each to
  ``size x size`` (bilinear), as torchvision's ``GeneralizedRCNNTransform`` with ``fixed_size``
  does for SSDLite.
* train mode: ``model(images, targets)`` with targets ``{"boxes": (G, 4) xyxy in that image's
  pixels, "labels": (G,) int64 in 1..num_classes-1}`` returns ``{"bbox_regression",
  "classification"}`` losses.
* eval mode: ``model(images)`` returns per image ``{"boxes" (xyxy in the pixels of *that input
  image*), "scores", "labels"}``.

Loading torchvision's ``ssdlite320_mobilenet_v3_large`` checkpoint
------------------------------------------------------------------
``ssdlite(weights=path_or_state_dict)`` maps torchvision's keys: its SSDLite backbone splits the
C4 block (``backbone.features.0`` = layers up to and including the expansion conv of the first
stride-32 block; ``backbone.features.1`` = the rest of that block then the later layers),
``backbone.extra.*`` are our ``extra.*`` and ``head.*`` is identical. Detections are then the
same as torchvision's (tested to 1e-3 px).

**Reduced tail.** torchvision's builder uses ``reduced_tail = (weights_backbone is None)``, and it
sets ``weights_backbone=None`` whenever ``weights`` (the COCO checkpoint) is given, so the
*published* ``ssdlite320_mobilenet_v3_large`` COCO checkpoint is a **reduced-tail** model (its
3,440,060 parameters are those of the reduced-tail build; the last conv has 480 channels). Load it
with ``ssdlite("large", reduced_tail=True, weights=...)``. Our ``reduced_tail`` defaults to
``False`` (the paper's main configuration and what an ImageNet-pretrained backbone needs); a
checkpoint with the other tail is a :class:`~mnv3det.weights.CheckpointMismatchError` that names
the mismatching keys and shapes.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from enum import Enum
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.ssdlite import (
    EXTRA_WIDTHS,
    SSD_BOX_CODER_WEIGHTS,
    BoxCoder,
    DefaultBoxGenerator,
    SSDLiteExtras,
    SSDLiteHead,
    multibox_loss,
)
from heads.ssdlite_postprocess import dense_postprocess, dense_to_list
from mnv3det.backbone import MobileNetV3Backbone, checkpoint_has_reduced_tail, mobilenet_v3
from mnv3det.models.normalize import SSDLITE_MEAN, SSDLITE_STD, Normalize
from mnv3det.pretrained import resolve_weights
from mnv3det.weights import (
    DESCRIPTION_VERSION,
    Checkpoint,
    CheckpointFormatError,
    LoadReport,
    load_matching,
    read_checkpoint,
    resolve_arguments,
    strip_prefix,
)

__all__ = [
    "SSDLITE_DEFAULTS",
    "SSDLite",
    "checkpoint_has_reduced_tail",
    "ssdlite",
    "torchvision_ssdlite_to_mnv3det",
]

#: Backbone taps of SSDLite (paper §6.3): C4 (expansion layer, stride 16) and C5 (stride 32).
SSDLITE_TAPS = ("stage5_expand", "last_conv")
"""The paper's C4 and C5 (§6.3); fixed, not configurable."""
#: Documented defaults of :func:`ssdlite` (used when neither an argument nor the checkpoint
#: gives a value).
SSDLITE_DEFAULTS: dict[str, object] = {
    "arch": "large",
    "num_classes": 91,
    "size": 320,
    "width_mult": 1.0,
    "reduced_tail": False,
    "score_thresh": 0.001,
    "nms_thresh": 0.55,
    "detections_per_img": 300,
    "topk_candidates": 300,
    "aspect_ratios": None,
    "min_ratio": 0.2,
    "max_ratio": 0.95,
    "image_mean": SSDLITE_MEAN,
    "image_std": SSDLITE_STD,
}
#: Post-processing settings an explicit argument may change on a described checkpoint.
SSDLITE_OVERRIDABLE = ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")
_SSDLITE_ANCHORS = ("backbone.", "extra.", "head.")


class InvalidTargetError(ValueError):
    """Training targets are missing or malformed."""


class SSDLite(nn.Module):
    """SSDLite detector: MobileNetV3 taps -> extra blocks -> separable heads.

    Build it with :func:`ssdlite`. Attributes ``score_thresh``, ``nms_thresh``,
    ``detections_per_img`` and ``topk_candidates`` may be changed after construction.

    Args:
        backbone: a :class:`MobileNetV3Backbone` with taps ``stage5_expand`` and ``last_conv``.
        num_classes: classes including background.
        size: network input side, or ``(H, W)``.
        width_mult: width multiplier of the extra blocks.
        aspect_ratios: per level aspect ratios of the default boxes.
        min_ratio: smallest default-box scale.
        max_ratio: largest default-box scale.
        score_thresh: minimum score of a detection.
        nms_thresh: NMS IoU threshold.
        detections_per_img: detections kept per image.
        topk_candidates: candidates per class before NMS.
        image_mean: normalisation mean of the ``[0, 1]`` input (0.5, torchvision's).
        image_std: normalisation std of the ``[0, 1]`` input (0.5, torchvision's).
        iou_threshold: matching IoU for training.
        neg_to_pos_ratio: hard negatives per positive.
        norm_layer: normalisation of the extra blocks and heads.
    """

    def __init__(
        self,
        backbone: MobileNetV3Backbone,
        num_classes: int = 91,
        size: int | tuple[int, int] = 320,
        width_mult: float = 1.0,
        aspect_ratios: Sequence[Sequence[float]] | None = None,
        min_ratio: float = 0.2,
        max_ratio: float = 0.95,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.55,
        detections_per_img: int = 300,
        topk_candidates: int = 300,
        image_mean: Sequence[float] = SSDLITE_MEAN,
        image_std: Sequence[float] = SSDLITE_STD,
        iou_threshold: float = 0.5,
        neg_to_pos_ratio: int = 3,
        norm_layer=None,
    ) -> None:
        super().__init__()
        names = [f.name for f in backbone.feature_info]
        if names != list(SSDLITE_TAPS):
            raise ValueError(f"SSDLite needs backbone taps {list(SSDLITE_TAPS)}, got {names}")
        self.size = _pair(size)
        if min(self.size) < 32:
            raise ValueError(f"ssdlite: size must be at least 32 pixels, got {size}")
        self.backbone = backbone
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        c4, c5 = backbone.channels
        self.extra = SSDLiteExtras(c5, EXTRA_WIDTHS, width_mult, norm_layer=norm_layer)
        in_channels = [c4, c5, *self.extra.out_channels]
        ratios = aspect_ratios if aspect_ratios is not None else [[2, 3]] * len(in_channels)
        if len(ratios) != len(in_channels):
            raise ValueError(
                f"ssdlite: aspect_ratios needs {len(in_channels)} levels, got {len(ratios)}"
            )
        self.width_mult = width_mult
        self.aspect_ratios = [list(level) for level in ratios]
        self.min_ratio = min_ratio
        self.max_ratio = max_ratio
        self.anchor_generator = DefaultBoxGenerator(ratios, min_ratio, max_ratio)
        self.head = SSDLiteHead(
            in_channels, self.anchor_generator.num_anchors_per_location(), num_classes, norm_layer
        )
        self.num_classes = num_classes
        self.box_coder = BoxCoder(weights=SSD_BOX_CODER_WEIGHTS)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.iou_threshold = iou_threshold
        self.neg_to_pos_ratio = neg_to_pos_ratio
        self.normalize = Normalize(image_mean, image_std)
        self.weights_report: LoadReport | None = None
        self.meta: dict = {}
        """Data facts from the checkpoint (``task``, ``label_map``, ``class_names``)."""

    @property
    def description(self) -> dict:
        """Everything :func:`ssdlite` needs to rebuild this model, as plain types.

        Stored in checkpoints under ``"mnv3det"`` (with the data module's ``label_map`` and
        ``class_names``, kept in :attr:`meta`); read back by
        :func:`mnv3det.models.from_checkpoint.load_model`.
        """
        bb = self.backbone
        return {
            "version": DESCRIPTION_VERSION,
            "task": "detection",
            "builder": "ssdlite",
            "arch": bb.arch,
            "width_mult": float(bb.width_mult),
            "reduced_tail": bool(bb.reduced_tail),
            "dilated": bool(bb.dilated),
            "size": list(self.size) if self.size[0] != self.size[1] else self.size[0],
            "num_classes": int(self.num_classes),
            "aspect_ratios": [list(level) for level in self.aspect_ratios],
            "min_ratio": float(self.min_ratio),
            "max_ratio": float(self.max_ratio),
            "score_thresh": float(self.score_thresh),
            "nms_thresh": float(self.nms_thresh),
            "detections_per_img": int(self.detections_per_img),
            "topk_candidates": int(self.topk_candidates),
            **self.normalize.description,
            **self.meta,
        }

    # ------------------------------------------------------------------ input
    def preprocess(
        self,
        images: Sequence[Tensor] | Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Normalise and resize to ``size``; scale target boxes alike.

        Returns:
            ``(batch (N, 3, H, W), original (h, w) per image, resized targets or None)``.
        """
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"ssdlite: a batched input must be (N, 3, H, W); got {tuple(images.shape)}"
                )
            images = list(images)
        if len(images) == 0:
            raise ValueError("ssdlite: got an empty list of images")
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"ssdlite: image {i} must be a (3, H, W) tensor, got {tuple(image.shape)}"
                )
            if not image.is_floating_point():
                raise TypeError(
                    f"ssdlite: image {i} has dtype {image.dtype}; expected floats in [0, 1] "
                    "(convert with image.float() / 255)"
                )
        original = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        if len(set(original)) == 1:  # one batched op when every image has the same size
            batch = self.transform(torch.stack(list(images)))
        else:  # torchvision's order: normalise, then resize each image
            batch = torch.cat([self.transform(im[None]) for im in images])
        if targets is not None:
            targets = [
                self._resize_target(t, hw, i)
                for i, (t, hw) in enumerate(zip(targets, original, strict=True))
            ]
        return batch, original, targets

    def transform(self, batch: Tensor) -> Tensor:
        """Normalise ``(N, 3, H, W)`` images in ``[0, 1]`` and resize them to ``size``.

        The one pre-processing of every path (eager :meth:`preprocess`, the fast path and the
        ONNX graph): always one bilinear resize (an identity at the model size), so the traced
        graph has no shape-dependent branch, as torchvision's transform always resizes.
        """
        batch = self.normalize(batch)
        return F.interpolate(batch, size=self.size, mode="bilinear", align_corners=False)

    def box_scale(self, image_sizes: Tensor) -> Tensor:
        """Factors from network-input to image pixels (torchvision's ``resize_boxes``).

        Args:
            image_sizes: ``(..., 2)`` float32 ``(height, width)`` of the original images.

        Returns:
            ``(..., 4)`` factors ``(sx, sy, sx, sy)`` multiplying xyxy boxes.
        """
        h, w = self.size
        ratio_w, ratio_h = image_sizes[..., 1] / float(w), image_sizes[..., 0] / float(h)
        return torch.stack((ratio_w, ratio_h, ratio_w, ratio_h), dim=-1)

    def _resize_target(
        self, target: dict[str, Tensor], hw: tuple[int, int], index: int
    ) -> dict[str, Tensor]:
        if "boxes" not in target or "labels" not in target:
            raise InvalidTargetError(
                f"ssdlite: target {index} needs 'boxes' and 'labels'; got {sorted(target)}"
            )
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise InvalidTargetError(
                f"ssdlite: target {index} 'boxes' must be a float (G, 4) xyxy tensor, got "
                f"{boxes.dtype} {tuple(boxes.shape)}"
            )
        if labels.shape != boxes.shape[:1]:
            raise InvalidTargetError(
                f"ssdlite: target {index} has {len(boxes)} boxes but labels of shape {tuple(labels.shape)}"
            )
        # as torchvision's SSD: a box with x2 <= x1 or y2 <= y1 (or NaN) gives an infinite or NaN
        # box-regression target (log of its width/height), hence a NaN loss; say which one
        invalid = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1) | ~torch.isfinite(boxes).all(dim=1)
        if bool(invalid.any()):
            box = boxes[int(torch.nonzero(invalid)[0])].tolist()
            raise InvalidTargetError(
                "ssdlite: all bounding boxes should have positive height and width (xyxy, "
                f"x2 > x1 and y2 > y1). Found invalid box {box} for target at index {index}; "
                "drop or fix it before training (the data modules of mnv3det drop such boxes)"
            )
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) >= self.num_classes):
            raise InvalidTargetError(
                f"ssdlite: target {index} has labels outside 1..{self.num_classes - 1} "
                f"({labels.unique().tolist()}); 0 is the background and num_classes counts it"
            )
        if hw != self.size:
            ratio = torch.tensor(
                [self.size[1] / hw[1], self.size[0] / hw[0]] * 2,
                dtype=boxes.dtype,
                device=boxes.device,
            )
            boxes = boxes * ratio
        return {**target, "boxes": boxes, "labels": labels}

    # ------------------------------------------------------------------ forward
    def head_outputs(self, batch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Run backbone, extras and heads on a preprocessed batch.

        Returns:
            ``({"cls_logits", "bbox_regression"}, anchors (A, 4) xyxy input pixels)``.
        """
        c4, c5 = self.backbone(batch).values()
        features = [c4, c5, *self.extra(c5)]
        outputs = self.head(features)
        anchors = self.anchor_generator(
            [tuple(f.shape[-2:]) for f in features],
            tuple(batch.shape[-2:]),
            batch.dtype,
            batch.device,
        )
        return outputs, anchors

    def forward(
        self,
        images: Sequence[Tensor] | Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses (train mode, needs ``targets``) or detections (eval mode); see the module doc."""
        if self.training and targets is None:
            raise InvalidTargetError("ssdlite: targets are required in training mode")
        if targets is not None and len(targets) != len(images):
            raise InvalidTargetError(f"ssdlite: {len(images)} images but {len(targets)} targets")
        batch, original, targets = self.preprocess(images, targets if self.training else None)
        outputs, anchors = self.head_outputs(batch)
        if self.training:
            # fp32 loss under autocast (bf16 outputs would put the ground truth in bf16 too)
            return multibox_loss(
                outputs["cls_logits"].float(),
                outputs["bbox_regression"].float(),
                anchors,
                targets,
                self.box_coder,
                self.iou_threshold,
                self.neg_to_pos_ratio,
            )
        return self.postprocess(outputs, anchors, original)

    def postprocess(
        self, outputs: dict[str, Tensor], anchors: Tensor, original_sizes: Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Detections in each original image's pixels (batched over images and classes)."""
        orig = torch.tensor(original_sizes, dtype=torch.float32, device=anchors.device)
        return dense_to_list(
            *self.postprocess_dense(outputs, anchors, self.box_scale(orig)[:, None])
        )

    def postprocess_dense(
        self,
        outputs: dict[str, Tensor],
        anchors: Tensor,
        scale: Tensor | None = None,
        *,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        topk_candidates: int | None = None,
        detections_per_img: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fixed-shape detections (:func:`heads.ssdlite_postprocess.dense_postprocess`; traces).

        Args:
            outputs: ``{"cls_logits", "bbox_regression"}`` of :meth:`head_outputs`.
            anchors: ``(A, 4)`` default boxes of :meth:`head_outputs`.
            scale: factors broadcastable to ``(N, D, 4)`` (:meth:`box_scale`) mapping boxes to
                the original image pixels, or ``None`` for network-input pixels.
            score_thresh: override of the model's minimum score.
            nms_thresh: override of the model's NMS IoU.
            topk_candidates: override of the candidates per class before NMS.
            detections_per_img: override of the output rows ``D``.

        Returns:
            ``(boxes (N, D, 4), scores (N, D), labels (N, D) int64, num_detections (N,))``;
            rows past ``num_detections`` are zeros.
        """
        return dense_postprocess(
            outputs["cls_logits"],
            outputs["bbox_regression"],
            anchors,
            self.size,
            self.box_coder.weights,
            score_thresh=self.score_thresh if score_thresh is None else score_thresh,
            nms_thresh=self.nms_thresh if nms_thresh is None else nms_thresh,
            topk_candidates=topk_candidates or self.topk_candidates,
            detections_per_img=detections_per_img or self.detections_per_img,
            scale=scale,
        )

    # ------------------------------------------------------------------ weights
    def load_weights(self, source: str | Path | Mapping[str, Tensor]) -> LoadReport:
        """Load torchvision's SSDLite checkpoint or one of ours (also a Lightning ``.ckpt`` of
        :class:`mnv3det.tasks.detection.DetectionTask`: the ``model.`` weights are used).

        Raises:
            CheckpointMismatchError: the checkpoint is another variant (keys/shapes named).
        """
        ckpt = read_checkpoint(source)
        return self.load_state(ckpt.state, ckpt.name)

    def load_state(self, state: Mapping[str, Tensor], name: str = "<state_dict>") -> LoadReport:
        """:meth:`load_weights` for a state_dict already read (``name`` is used in messages).

        A DetectionTask checkpoint gives its EMA weights when it has them (those are the
        evaluated ones), else the trained weights (:func:`mnv3det.weights.strip_prefix`).
        """
        fmt = (
            "mnv3det EMA" if any(k.startswith("ema.module.backbone.") for k in state) else "mnv3det"
        )
        state = _ssdlite_state(state, name)
        if any(k.startswith("backbone.extra.") for k in state):
            state, fmt = torchvision_ssdlite_to_mnv3det(state), "torchvision"
        report = load_matching(self, state, name, fmt, describe=self.describe())
        if report.unused:
            warnings.warn(str(report), stacklevel=2)
        self.weights_report = report
        return report

    def describe(self) -> str:
        bb = self.backbone
        return (
            f"ssdlite({bb.arch!r}, num_classes={self.num_classes}, width_mult={bb.width_mult}, "
            f"reduced_tail={bb.reduced_tail})"
        )


def _ssdlite_state(state: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """Our keys from any SSDLite checkpoint; CheckpointFormatError for another network's."""
    state = strip_prefix(dict(state), _SSDLITE_ANCHORS)
    if not any(k.startswith("head.classification_head.") for k in state):
        sample = ", ".join(list(state)[:4])
        raise CheckpointFormatError(
            f"checkpoint {name} is not an SSDLite checkpoint: expected keys like "
            "'backbone.features.0.0.weight' and 'head.classification_head...' (torchvision's "
            f"ssdlite320_mobilenet_v3_large, ours or a DetectionTask .ckpt); first keys: {sample}"
        )
    return state


def _infer_ssdlite(state: Mapping[str, Tensor], arch: str, width_mult: float) -> dict:
    """What the tensors say: the tail and (for the default 6 boxes per cell) the classes."""
    inferred: dict[str, object] = {
        "reduced_tail": checkpoint_has_reduced_tail(state, arch, width_mult)
    }
    cls = state.get("head.classification_head.module_list.0.1.weight")
    if cls is not None and cls.shape[0] % 6 == 0:
        inferred["num_classes"] = int(cls.shape[0]) // 6
    return inferred


_TV_C4 = re.compile(r"^backbone\.features\.0\.(\d+)\.")


def torchvision_ssdlite_to_mnv3det(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision SSDLite keys to ours.

    torchvision (``SSDLiteFeatureExtractorMobileNet``) holds the backbone as
    ``features.0 = Sequential(*mobilenet.features[:c4], mobilenet.features[c4].block[0])`` and
    ``features.1 = Sequential(mobilenet.features[c4].block[1:], *mobilenet.features[c4 + 1:])``
    where ``c4`` is the first stride-32 block. So:

    * ``backbone.features.0.{i}.*`` (``i < c4``) -> ``backbone.features.{i}.*``
    * ``backbone.features.0.{c4}.*`` -> ``backbone.features.{c4}.block.0.*``
    * ``backbone.features.1.0.{j}.*`` (the sliced block keeps its indices) ->
      ``backbone.features.{c4}.block.{j}.*``
    * ``backbone.features.1.{m}.*`` (``m >= 1``) -> ``backbone.features.{c4 + m}.*``
    * ``backbone.extra.*`` -> ``extra.*``; ``head.*`` unchanged.
    """
    indices = [int(m[1]) for k in state if (m := _TV_C4.match(k))]
    if not indices:
        raise ValueError("not a torchvision SSDLite checkpoint: no 'backbone.features.0.N' keys")
    c4 = max(indices)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("backbone.features.0."):
            i = int(parts[3])
            new = f"backbone.features.{i}." if i < c4 else f"backbone.features.{c4}.block.0."
            out[new + ".".join(parts[4:])] = value
        elif key.startswith("backbone.features.1."):
            m = int(parts[3])
            if m == 0:
                out[f"backbone.features.{c4}.block." + ".".join(parts[4:])] = value
            else:
                out[f"backbone.features.{c4 + m}." + ".".join(parts[4:])] = value
        elif key.startswith("backbone.extra."):
            out[key[len("backbone.") :]] = value
        else:
            out[key] = value
    return out


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    values = tuple(int(s) for s in size)
    if len(values) != 2:
        raise ValueError(f"ssdlite: size must be an int or (height, width), got {size!r}")
    return values


def ssdlite(
    arch: str | None = None,
    num_classes: int | None = None,
    size: int | tuple[int, int] | None = None,
    width_mult: float | None = None,
    reduced_tail: bool | None = None,
    weights: str | Path | Mapping[str, Tensor] | Checkpoint | Enum | None = None,
    weights_backbone: str | Path | Mapping[str, Tensor] | Enum | None = None,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    detections_per_img: int | None = None,
    topk_candidates: int | None = None,
    *,
    aspect_ratios: Sequence[Sequence[float]] | None = None,
    min_ratio: float | None = None,
    max_ratio: float | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> SSDLite:
    """Build SSDLite-MobileNetV3 (paper §6.3).

    Every argument left at ``None`` is taken from ``weights`` when the checkpoint describes its
    model (our ``.pt``/``.ckpt`` files store ``checkpoint["mnv3det"]``; older ``.ckpt`` files
    their hyper-parameters), else inferred from the tensors where possible (``reduced_tail``,
    ``num_classes``), else the default shown below. An explicit argument that contradicts the
    checkpoint's description raises :class:`~mnv3det.weights.CheckpointConflictError` naming
    both values (the post-processing settings ``score_thresh``, ``nms_thresh``,
    ``detections_per_img`` and ``topk_candidates`` may be changed).

    Args:
        arch: "large" (default) or "small".
        num_classes: classes including background (default 91: COCO in torchvision's layout).
        size: network input side (default 320, torchvision's); 512, 640 or ``(H, W)`` work too,
            the default boxes follow the feature-map sizes.
        width_mult: width multiplier of the backbone and the extra blocks (default 1.0).
        reduced_tail: halve the last stage (paper's "†"/RF2). Default: read from ``weights``
            (torchvision's published COCO checkpoint is reduced-tail, see the module
            docstring), else ``False``. Use ``False`` with an ImageNet ``weights_backbone``
            (torchvision's builder does the same).
        weights: whole-detector checkpoint: torchvision's ``ssdlite320_mobilenet_v3_large`` file
            or state_dict, one of ours, a DetectionTask ``.ckpt`` or a read
            :class:`~mnv3det.weights.Checkpoint`; or a name, downloaded once (see
            :mod:`mnv3det.pretrained`): ``"DEFAULT"``, ``"COCO_V1"``,
            ``SSDLite320_MobileNet_V3_Large_Weights.COCO_V1`` or its string (Large only; 91
            classes and the reduced tail are read from the file).
        weights_backbone: MobileNetV3 ImageNet checkpoint for the backbone (torchvision or timm;
            see :mod:`mnv3det.weights`), or one of :func:`mnv3det.mobilenet_v3`'s weight names
            (``"IMAGENET1K_V1"``, ``"hf-hub:timm/..."``). Ignored keys (classifier) are reported.
        score_thresh: minimum score (default 0.001, torchvision's).
        nms_thresh: NMS IoU (default 0.55).
        detections_per_img: detections per image (default 300).
        topk_candidates: candidates per class before NMS (default 300).
        aspect_ratios: per level aspect ratios (default ``[2, 3]`` at 6 levels).
        min_ratio: smallest default-box scale (default 0.2).
        max_ratio: largest default-box scale (default 0.95).
        image_mean: normalisation mean (default 0.5).
        image_std: normalisation std (default 0.5).

    Returns:
        An :class:`SSDLite` module (train mode: losses; eval mode: detections);
        ``model.description`` says how it was built.

    Raises:
        CheckpointNotFoundError, CheckpointReadError: ``weights`` is missing or unreadable.
        CheckpointFormatError: ``weights`` is not an SSDLite checkpoint.
        CheckpointConflictError: an argument contradicts the checkpoint.
        CheckpointMismatchError: the tensors do not fit the model (keys and shapes named).
    """
    explicit = {k: v for k, v in locals().items() if k in SSDLITE_DEFAULTS}
    weights = resolve_weights(weights, "ssdlite", arch)
    ckpt = read_checkpoint(weights) if weights is not None else None
    state, inferred = None, {}
    if ckpt is not None:
        state = _ssdlite_state(ckpt.state, ckpt.name)
        described = ckpt.description
        inferred = _infer_ssdlite(
            state,
            explicit["arch"] or described.get("arch") or SSDLITE_DEFAULTS["arch"],
            explicit["width_mult"] or described.get("width_mult") or SSDLITE_DEFAULTS["width_mult"],
        )
    args = resolve_arguments(
        "ssdlite", explicit, ckpt, SSDLITE_DEFAULTS, inferred, overridable=SSDLITE_OVERRIDABLE
    )
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    backbone = mobilenet_v3(
        args["arch"],
        width_mult=args["width_mult"],
        reduced_tail=args["reduced_tail"],
        taps=list(SSDLITE_TAPS),
        weights=weights_backbone if ckpt is None else None,
        norm_layer=norm_layer,
    )
    model = SSDLite(
        backbone,
        num_classes=args["num_classes"],
        size=tuple(args["size"]) if isinstance(args["size"], list) else args["size"],
        width_mult=args["width_mult"],
        aspect_ratios=args["aspect_ratios"],
        min_ratio=args["min_ratio"],
        max_ratio=args["max_ratio"],
        score_thresh=args["score_thresh"],
        nms_thresh=args["nms_thresh"],
        detections_per_img=args["detections_per_img"],
        topk_candidates=args["topk_candidates"],
        image_mean=args["image_mean"],
        image_std=args["image_std"],
        norm_layer=norm_layer,
    )
    if ckpt is not None:
        model.meta = {
            k: ckpt.description[k] for k in ("label_map", "class_names") if k in ckpt.description
        }
        model.load_state(state, ckpt.name)
    return model
