"""The SSDLite detection head (MobileNetV3 paper §6.3; SSD, Liu et al. 2016; SSDLite, MobileNetV2 §6.2).

Howard et al., "Searching for MobileNetV3", ICCV 2019, §6.3 attaches SSDLite to two backbone taps
(C4 = the expansion layer of the first stride-32 block, still at stride 16, and C5 = the last
conv at stride 32) and adds four "extra" blocks, each ``1x1 conv -> depthwise 3x3 stride 2 -> 1x1
conv`` with widths 512/256/256/128 (scaled by the width multiplier, at least 16 channels), giving
six prediction levels. Every level has separable prediction heads (depthwise 3x3 + BN + ReLU6,
then a 1x1 conv) for class logits and box offsets over the default boxes (anchors) of its cells.

This module holds everything of SSDLite that does not depend on the backbone: it takes channel
lists and feature maps and knows nothing of MobileNetV3 (``mnv3det.models.ssdlite`` attaches it).

* :class:`SSDLiteExtras` and :class:`SSDLiteHead`: the layers, with torchvision's module names
  (``extra.K.{0,1,2}``, ``classification_head.module_list.K``, ``regression_head.module_list.K``)
  and initialisation (normal, std 0.03), so torchvision's ``ssdlite320_mobilenet_v3_large`` keys
  map one-to-one.
* :class:`DefaultBoxGenerator`: SSD default boxes from ``min_ratio``/``max_ratio`` and per-level
  aspect ratios. The grid follows the **feature-map sizes** of the actual input, so any input
  size (320, 512, 640, non-square) gets anchors covering the image; results are cached per
  (grid sizes, image size). Same boxes, in the same order, as torchvision's generator.
* :data:`BoxCoder` is torchvision's (``weights=(10, 10, 5, 5)`` for SSD), re-exported.
* :func:`match_anchors` / :func:`multibox_loss`: SSD matching (IoU >= 0.5, plus the best anchor of
  every ground-truth box) and the multibox loss (smooth-L1 on positives + cross-entropy with 3:1
  hard negative mining, both divided by the number of positives) -- computed for the whole batch
  at once on padded targets instead of torchvision's per-image loop; same values.
* :func:`postprocess_detections` (from :mod:`heads.ssdlite_postprocess`, re-exported here):
  torchvision's ``SSD.postprocess_detections`` batched over images and classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops.misc import Conv2dNormActivation

from heads.ssdlite_postprocess import postprocess_detections

__all__ = [
    "BoxCoder",
    "DefaultBoxGenerator",
    "SSDLiteExtras",
    "SSDLiteHead",
    "SSDLiteScoringHead",
    "default_norm_layer",
    "extra_block",
    "match_anchors",
    "multibox_loss",
    "postprocess_detections",
    "prediction_block",
]

NormLayer = Callable[[int], nn.Module]
#: SSD's box coding weights (torchvision ``SSD``: ``BoxCoder(weights=(10., 10., 5., 5.))``).
SSD_BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
#: Widths of the four extra blocks at width multiplier 1.0 (paper §6.3, torchvision).
EXTRA_WIDTHS = (512, 256, 256, 128)


def default_norm_layer() -> NormLayer:
    """torchvision's SSDLite BatchNorm: eps 0.001, momentum 0.03."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


def _normal_init(module: nn.Module) -> None:
    """torchvision's SSDLite init of the extra blocks and heads: N(0, 0.03), bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=0.03)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0.0)


# ----------------------------------------------------------------------------- layers
def extra_block(in_channels: int, out_channels: int, norm_layer: NormLayer) -> nn.Sequential:
    """One extra block: 1x1 to ``out/2`` -> depthwise 3x3 stride 2 -> 1x1 to ``out``, ReLU6."""
    mid = out_channels // 2
    return nn.Sequential(
        Conv2dNormActivation(
            in_channels, mid, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6
        ),
        Conv2dNormActivation(
            mid,
            mid,
            kernel_size=3,
            stride=2,
            groups=mid,
            norm_layer=norm_layer,
            activation_layer=nn.ReLU6,
        ),
        Conv2dNormActivation(
            mid, out_channels, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6
        ),
    )


class SSDLiteExtras(nn.ModuleList):
    """The extra feature layers after the last backbone tap (paper §6.3).

    Args:
        in_channels: channels of the deepest backbone tap (C5).
        widths: output widths at width multiplier 1.0 (default 512/256/256/128).
        width_mult: multiplier; a block gets ``max(min_depth, int(width * width_mult))``
            channels (torchvision's ``get_depth``).
        min_depth: smallest width.
        norm_layer: normalisation layer (default BatchNorm eps 0.001 momentum 0.03).
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int] = EXTRA_WIDTHS,
        width_mult: float = 1.0,
        min_depth: int = 16,
        norm_layer: NormLayer | None = None,
    ) -> None:
        norm_layer = norm_layer or default_norm_layer()
        if in_channels < 1 or not widths:
            raise ValueError(
                f"SSDLiteExtras: need in_channels >= 1 and at least one width; got "
                f"in_channels={in_channels}, widths={list(widths)}"
            )
        self.out_channels = [max(min_depth, int(w * width_mult)) for w in widths]
        blocks = []
        for out in self.out_channels:
            blocks.append(extra_block(in_channels, out, norm_layer))
            in_channels = out
        super().__init__(blocks)
        _normal_init(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the output of every extra block (each half the previous resolution)."""
        out = []
        for block in self:
            x = block(x)
            out.append(x)
        return out


def prediction_block(
    in_channels: int, out_channels: int, kernel_size: int, norm_layer: NormLayer
) -> nn.Sequential:
    """Separable prediction layer: depthwise kxk + BN + ReLU6, then a 1x1 conv with bias."""
    return nn.Sequential(
        Conv2dNormActivation(
            in_channels,
            in_channels,
            kernel_size=kernel_size,
            groups=in_channels,
            norm_layer=norm_layer,
            activation_layer=nn.ReLU6,
        ),
        nn.Conv2d(in_channels, out_channels, 1),
    )


class SSDLiteScoringHead(nn.Module):
    """Per-level separable predictors whose outputs are concatenated over levels.

    Args:
        in_channels: channels of each level's feature map.
        num_anchors: default boxes per cell at each level.
        num_columns: values predicted per default box (classes, or 4 box offsets).
        norm_layer: normalisation layer.

    The output is ``(N, sum_k H_k * W_k * A_k, num_columns)`` ordered level, row, column,
    anchor (torchvision's ``SSDScoringHead`` layout, which :class:`DefaultBoxGenerator` follows).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_columns: int,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(num_anchors):
            raise ValueError(
                f"SSDLiteScoringHead: {len(in_channels)} levels of in_channels but "
                f"{len(num_anchors)} of num_anchors"
            )
        norm_layer = norm_layer or default_norm_layer()
        self.num_columns = num_columns
        self.module_list = nn.ModuleList(
            prediction_block(c, num_columns * a, 3, norm_layer)
            for c, a in zip(in_channels, num_anchors, strict=True)
        )
        _normal_init(self.module_list)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Predict on each level and flatten to ``(N, total_anchors, num_columns)``."""
        if len(features) != len(self.module_list):
            raise ValueError(
                f"SSDLite head expects {len(self.module_list)} feature maps, got {len(features)}"
            )
        outputs = []
        for module, feature in zip(self.module_list, features, strict=True):
            out = module(feature)
            n, _, h, w = out.shape
            out = out.view(n, -1, self.num_columns, h, w).permute(0, 3, 4, 1, 2)
            outputs.append(out.reshape(n, -1, self.num_columns))
        return torch.cat(outputs, dim=1)


class SSDLiteHead(nn.Module):
    """Classification and box-regression heads of SSDLite.

    Args:
        in_channels: channels of the prediction levels (backbone taps then extra blocks).
        num_anchors: default boxes per cell of each level.
        num_classes: classes including the background (index 0).
        norm_layer: normalisation layer (default BatchNorm eps 0.001 momentum 0.03).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_classes: int,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"SSDLiteHead: num_classes counts the background and must be >= 2; got {num_classes}"
            )
        self.num_classes = num_classes
        self.classification_head = SSDLiteScoringHead(
            in_channels, num_anchors, num_classes, norm_layer
        )
        self.regression_head = SSDLiteScoringHead(in_channels, num_anchors, 4, norm_layer)

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        """Return ``{"cls_logits": (N, A, num_classes), "bbox_regression": (N, A, 4)}``."""
        return {
            "cls_logits": self.classification_head(features),
            "bbox_regression": self.regression_head(features),
        }


# ----------------------------------------------------------------------------- default boxes
class DefaultBoxGenerator(nn.Module):
    """SSD default boxes (Liu et al. 2016, §2.2 "Choosing scales and aspect ratios").

    Level ``k`` of ``m`` gets scale ``s_k = min_ratio + (max_ratio - min_ratio) k / (m - 1)``
    (and ``s_m = 1``); each cell gets boxes of side ``s_k`` and ``sqrt(s_k s_{k+1})`` plus, per
    aspect ratio ``r``, ``(s_k sqrt(r), s_k / sqrt(r))`` and its transpose. Sizes are fractions of
    the input's width/height and the centres lie on each feature map's own grid, so the boxes
    follow whatever feature-map sizes the input produces (any input size).

    Args:
        aspect_ratios: per level, the aspect ratios besides 1 (SSDLite: ``[2, 3]`` at 6 levels).
        min_ratio: scale of the first level (SSDLite 0.2).
        max_ratio: scale of the last level (SSDLite 0.95).
        clip: clip widths/heights to 1 (the whole image), as torchvision does.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[Sequence[float]],
        min_ratio: float = 0.2,
        max_ratio: float = 0.95,
        clip: bool = True,
    ) -> None:
        super().__init__()
        if not aspect_ratios:
            raise ValueError("DefaultBoxGenerator: aspect_ratios needs one entry per level")
        if not 0 < min_ratio <= max_ratio:
            raise ValueError(
                f"DefaultBoxGenerator: need 0 < min_ratio <= max_ratio, got {min_ratio}, {max_ratio}"
            )
        self.aspect_ratios = [list(r) for r in aspect_ratios]
        self.min_ratio, self.max_ratio, self.clip = min_ratio, max_ratio, clip
        m = len(self.aspect_ratios)
        if m > 1:
            self.scales = [min_ratio + (max_ratio - min_ratio) * k / (m - 1.0) for k in range(m)]
            self.scales.append(1.0)
        else:
            self.scales = [min_ratio, max_ratio]
        self._wh: list[list[tuple[float, float]]] = []
        for k, ratios in enumerate(self.aspect_ratios):
            s_k, s_next = self.scales[k], self.scales[k + 1]
            s_prime = math.sqrt(s_k * s_next)
            pairs = [(s_k, s_k), (s_prime, s_prime)]
            for ar in ratios:
                sq = math.sqrt(ar)
                pairs += [(s_k * sq, s_k / sq), (s_k / sq, s_k * sq)]
            self._wh.append(pairs)
        self._cache: dict[tuple, Tensor] = {}

    def num_anchors_per_location(self) -> list[int]:
        """Default boxes per feature-map cell at each level (``2 + 2 * len(ratios)``)."""
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def forward(
        self,
        grid_sizes: Sequence[tuple[int, int]],
        image_size: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Default boxes of one input, ``(A, 4)`` xyxy in input pixels.

        Args:
            grid_sizes: ``(H_k, W_k)`` of each level's feature map.
            image_size: ``(H, W)`` of the (resized) input.
            dtype: box dtype.
            device: box device.
        """
        if len(grid_sizes) != len(self._wh):
            raise ValueError(
                f"DefaultBoxGenerator has {len(self._wh)} levels but got {len(grid_sizes)} "
                "feature maps"
            )
        key = (
            tuple(tuple(int(v) for v in g) for g in grid_sizes),
            tuple(image_size),
            dtype,
            str(device),
        )
        if key not in self._cache:
            self._cache[key] = self._make(grid_sizes, image_size, dtype).to(device)
        return self._cache[key]

    def _make(
        self, grid_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int], dtype: torch.dtype
    ) -> Tensor:
        # Same operations, in the same order and dtype, as torchvision's DefaultBoxGenerator
        # (steps=None), so the boxes are bitwise equal to the ones its checkpoints were trained with.
        boxes = []
        for (fh, fw), pairs in zip(grid_sizes, self._wh, strict=True):
            fh, fw = int(fh), int(fw)
            shifts_x = ((torch.arange(0, fw) + 0.5) / fw).to(dtype=dtype)
            shifts_y = ((torch.arange(0, fh) + 0.5) / fh).to(dtype=dtype)
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y) * len(pairs), dim=-1).reshape(-1, 2)
            wh = torch.as_tensor(pairs, dtype=dtype)
            if self.clip:
                wh = wh.clamp(min=0, max=1)
            boxes.append(torch.cat((shifts, wh.repeat(fh * fw, 1)), dim=1))
        cxcywh = torch.cat(boxes, dim=0)
        x_y_size = torch.tensor([image_size[1], image_size[0]])
        return torch.cat(
            [
                (cxcywh[:, :2] - 0.5 * cxcywh[:, 2:]) * x_y_size,
                (cxcywh[:, :2] + 0.5 * cxcywh[:, 2:]) * x_y_size,
            ],
            dim=-1,
        )

    def extra_repr(self) -> str:
        return (
            f"aspect_ratios={self.aspect_ratios}, min_ratio={self.min_ratio}, "
            f"max_ratio={self.max_ratio}, clip={self.clip}"
        )


# ----------------------------------------------------------------------------- loss
def _pairwise_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of ``boxes (N, G, 4)`` with ``anchors (A, 4)`` -> ``(N, G, A)`` (torchvision's box_iou,
    broadcast over the batch)."""
    area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    lt = torch.max(boxes[..., None, :2], anchors[:, :2])
    rb = torch.min(boxes[..., None, 2:], anchors[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_b[..., None] + area_a - inter)


def _pad_targets(
    targets: Sequence[dict[str, Tensor]], like: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Stack variable-length ground truth into ``boxes (N, G, 4)``, ``labels (N, G)``,
    ``valid (N, G)``; ``G`` is the largest count in the batch (0 when every image is empty)."""
    counts = [len(t["boxes"]) for t in targets]
    g = max(counts, default=0)
    n = len(targets)
    boxes = like.new_zeros((n, g, 4))
    labels = torch.zeros((n, g), dtype=torch.int64, device=like.device)
    valid = torch.zeros((n, g), dtype=torch.bool, device=like.device)
    for i, (t, c) in enumerate(zip(targets, counts, strict=True)):  # copying, not computing
        if c:
            boxes[i, :c] = t["boxes"].to(like)
            labels[i, :c] = t["labels"]
            valid[i, :c] = True
    return boxes, labels, valid


def match_anchors(
    gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor, iou_threshold: float = 0.5
) -> Tensor:
    """SSD matching for a padded batch (torchvision's ``SSDMatcher``).

    An anchor takes the ground-truth box it overlaps most when that IoU is >= ``iou_threshold``;
    besides, every ground-truth box claims its best anchor whatever the IoU.

    Args:
        gt_boxes: ``(N, G, 4)`` xyxy (padding rows ignored).
        gt_valid: ``(N, G)`` which rows are real boxes.
        anchors: ``(A, 4)`` xyxy.
        iou_threshold: positive IoU (SSD 0.5).

    Returns:
        ``(N, A)`` index of the matched box per anchor, ``-1`` for background.
    """
    n, g = gt_valid.shape
    matches = torch.full((n, anchors.shape[0]), -1, dtype=torch.int64, device=anchors.device)
    if g == 0 or not bool(gt_valid.any()):
        return matches
    iou = _pairwise_iou(gt_boxes, anchors).masked_fill(~gt_valid[..., None], -1.0)
    best_iou, best_gt = iou.max(dim=1)  # (N, A)
    matches = torch.where(best_iou >= iou_threshold, best_gt, matches)
    best_anchor = iou.argmax(dim=2)  # (N, G)
    img, gt = gt_valid.nonzero(as_tuple=True)
    matches[img, best_anchor[img, gt]] = gt
    return matches


def multibox_loss(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    targets: Sequence[dict[str, Tensor]],
    box_coder: BoxCoder,
    iou_threshold: float = 0.5,
    neg_to_pos_ratio: int = 3,
) -> dict[str, Tensor]:
    """SSD multibox loss with hard negative mining, for the whole batch at once.

    Args:
        cls_logits: ``(N, A, C)`` class logits (index 0 = background).
        bbox_regression: ``(N, A, 4)`` encoded box offsets.
        anchors: ``(A, 4)`` default boxes, xyxy in input pixels.
        targets: per image ``{"boxes": (G_i, 4) xyxy input pixels, "labels": (G_i,) in 1..C-1}``.
        box_coder: encodes ground truth against anchors (SSD weights 10, 10, 5, 5).
        iou_threshold: matching IoU.
        neg_to_pos_ratio: hard negatives kept per positive (SSD: 3).

    Returns:
        ``{"bbox_regression": smooth-L1 sum over positives / P, "classification":
        (CE over positives + CE over the 3P hardest negatives of each image) / P}`` with ``P``
        the number of positives in the batch (at least 1), as torchvision's ``SSD.compute_loss``.
    """
    n, a, c = cls_logits.shape
    gt_boxes, gt_labels, gt_valid = _pad_targets(targets, bbox_regression)
    matches = match_anchors(gt_boxes, gt_valid, anchors.to(bbox_regression), iou_threshold)
    foreground = matches >= 0
    num_foreground = int(foreground.sum())
    idx = matches.clamp(min=0)

    fg_img, fg_anchor = foreground.nonzero(as_tuple=True)
    fg_gt = idx[fg_img, fg_anchor]
    target_regression = box_coder.encode_single(
        gt_boxes[fg_img, fg_gt], anchors[fg_anchor].to(gt_boxes)
    )
    bbox_loss = F.smooth_l1_loss(
        bbox_regression[fg_img, fg_anchor], target_regression, reduction="sum"
    )

    if gt_labels.shape[1]:
        cls_targets = torch.where(foreground, gt_labels.gather(1, idx), torch.zeros_like(idx))
    else:
        cls_targets = torch.zeros((n, a), dtype=torch.int64, device=cls_logits.device)
    cls_loss = F.cross_entropy(
        cls_logits.reshape(-1, c), cls_targets.reshape(-1), reduction="none"
    ).view(n, a)

    # Hard negative mining (torchvision's formulation): rank each image's background anchors by
    # loss and keep the top neg_to_pos_ratio * (its positives).
    fg_mask = cls_targets > 0
    num_negative = neg_to_pos_ratio * fg_mask.sum(1, keepdim=True)
    negative_loss = cls_loss.clone()
    negative_loss[fg_mask] = -float("inf")
    _, order = negative_loss.sort(1, descending=True)
    background = order.sort(1)[1] < num_negative

    denom = max(1, num_foreground)
    return {
        "bbox_regression": bbox_loss / denom,
        "classification": (cls_loss[fg_mask].sum() + cls_loss[background].sum()) / denom,
    }
