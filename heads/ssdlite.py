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
* :func:`postprocess_detections`: softmax, decode, clip, per-(image, class) score threshold and
  top-k, **one** grouped NMS over every (image, class) of the batch (:func:`grouped_nms`), and
  the per-image cap -- no Python loop over images or classes; same detections as torchvision's
  ``SSD.postprocess_detections``.
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

__all__ = [
    "BoxCoder",
    "DefaultBoxGenerator",
    "SSDLiteExtras",
    "SSDLiteHead",
    "SSDLiteScoringHead",
    "default_norm_layer",
    "extra_block",
    "grouped_nms",
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


# ----------------------------------------------------------------------------- post-processing
def grouped_nms(
    boxes: Tensor, valid: Tensor, iou_threshold: float, chunk_elements: int = 2**26
) -> Tensor:
    """Greedy NMS in many independent groups at once (e.g. one group per image and class).

    Hand-written because neither torchvision path fits SSD's many small groups on the CPU:
    ``torchvision.ops.batched_nms`` loops in Python over the groups above 1000 boxes (0.14 s for
    one image x 90 classes x 300 candidates, 8 s for 8 images on this 2-core machine), and one
    ``nms`` call with its coordinate trick compares every box with every other, groups or not
    (O(total^2): 2 s for one image, minutes for 8). Here each group's IoU matrix is computed at
    once and the greedy pass walks the ranks (each step vectorised over all groups), so the work
    is O(groups x K^2) with no loop over groups, images or classes. Groups are bucketed by their
    number of boxes (powers of two) so that one long group does not pad every other group to
    its length. The overlap test is the one of torchvision's ``nms`` kernel
    (``inter / (area_i + area_j - inter) > iou_threshold``), so the kept boxes are the same.

    Args:
        boxes: ``(G, K, 4)`` xyxy, each row (group) sorted by decreasing score.
        valid: ``(G, K)`` which entries are real boxes (padding is never kept and suppresses
            nothing).
        iou_threshold: a box is dropped when its IoU with a kept, higher-ranked box of its group
            is above this.
        chunk_elements: at most about this many (bool) overlap entries are held at once
            (memory bound).

    Returns:
        ``(G, K)`` bool mask of the kept boxes.
    """
    g, k = valid.shape
    keep = valid.clone()
    if g == 0 or k == 0:
        return keep
    positions = torch.arange(1, k + 1, device=valid.device)
    lengths = (valid * positions).amax(dim=1)  # 1 + index of the last real box of each group
    low = 1  # groups of 0 or 1 boxes need no NMS
    while low < k:  # ~log2(K) size buckets: a loop over sizes, not over groups
        high = min(2 * low, k)
        rows = ((lengths > low) & (lengths <= high)).nonzero().flatten()
        step = max(1, chunk_elements // (high * high))
        for start in range(0, rows.numel(), step):  # memory chunks, usually one
            sel = rows[start : start + step]
            keep[sel, :high] = _greedy_dense(boxes[sel, :high], keep[sel, :high], iou_threshold)
        low = high
    return keep


def _suppression(boxes: Tensor, iou_threshold: float) -> Tensor:
    """``(G, K, K)`` bool: IoU(box i, box j) > threshold within each group (torchvision's
    ``nms`` kernel formula)."""
    x1, y1, x2, y2 = (v.contiguous() for v in boxes.unbind(-1))
    area = (x2 - x1) * (y2 - y1)
    w = torch.minimum(x2[:, :, None], x2[:, None, :])
    w = w.sub_(torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)
    h = torch.minimum(y2[:, :, None], y2[:, None, :])
    h = h.sub_(torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    inter = w.mul_(h)
    union = (area[:, :, None] + area[:, None, :]).sub_(inter)
    return inter.div_(union) > iou_threshold  # 0/0 (two empty boxes) is NaN: no suppression


def _greedy_dense(
    boxes: Tensor, keep: Tensor, iou_threshold: float, cache_elements: int = 2**19
) -> Tensor:
    """Greedy NMS of ``(G, K, 4)`` score-sorted groups with a dense IoU test.

    The float IoU work is done a few groups at a time (``cache_elements`` entries, ~2 MB), which
    keeps it in the CPU cache: 5x faster than one pass over all groups, as measured for 90
    groups x 300 boxes. Only the bool result is kept for all groups.
    """
    g, k = keep.shape
    later = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(diagonal=1)
    # suppress_by[i] = (G, K): which boxes rank i suppresses (only lower ranks), contiguous so
    # that each greedy step below runs on contiguous memory.
    suppress_by = torch.empty((k, g, k), dtype=torch.bool, device=boxes.device)
    step = max(1, cache_elements // (k * k))
    for start in range(0, g, step):  # cache-sized blocks of groups
        block = _suppression(boxes[start : start + step], iou_threshold) & later
        suppress_by[:, start : start + step] = block.transpose(0, 1)
    keep = keep.clone()
    for i in range(k - 1):  # rank i's fate is final once the ranks above it are done
        keep &= ~(suppress_by[i] & keep[:, i : i + 1])
    return keep


def postprocess_detections(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    image_size: tuple[int, int],
    box_coder: BoxCoder,
    score_thresh: float = 0.001,
    nms_thresh: float = 0.55,
    topk_candidates: int = 300,
    detections_per_img: int = 300,
    scale_factors: Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Turn head outputs into detections, batched over images and classes.

    Per image and class: keep scores above ``score_thresh``, then the ``topk_candidates`` best;
    NMS per (image, class) with ``nms_thresh``; keep the ``detections_per_img`` best of each
    image. That is torchvision's ``SSD.postprocess_detections``, with its per-image, per-class
    loops replaced by one top-k over a ``(N, classes, anchors)`` tensor and one grouped NMS over
    all (image, class) groups (:func:`grouped_nms`).

    Args:
        cls_logits: ``(N, A, C)``.
        bbox_regression: ``(N, A, 4)``.
        anchors: ``(A, 4)`` xyxy in input pixels (the same for every image of the batch).
        image_size: ``(H, W)`` of the network input; boxes are clipped to it.
        box_coder: decodes offsets against anchors.
        score_thresh: minimum class probability.
        nms_thresh: IoU threshold of NMS.
        topk_candidates: candidates per (image, class) before NMS.
        detections_per_img: detections kept per image.
        scale_factors: optional ``(N, 2)`` ``(sx, sy)`` multiplying the final boxes of each
            image (to map them from the network input to the original image pixels).

    Returns:
        Per image ``{"boxes": (D, 4) xyxy, "scores": (D,), "labels": (D,) int64}``, sorted by
        decreasing score.
    """
    n, a, _ = cls_logits.shape
    scores = F.softmax(cls_logits, dim=-1)
    boxes = box_coder.decode_single(bbox_regression.reshape(-1, 4), anchors.repeat(n, 1))
    boxes = boxes.view(n, a, 4)
    height, width = image_size
    boxes = torch.stack(
        (
            boxes[..., 0].clamp(min=0, max=width),
            boxes[..., 1].clamp(min=0, max=height),
            boxes[..., 2].clamp(min=0, max=width),
            boxes[..., 3].clamp(min=0, max=height),
        ),
        dim=-1,
    )

    # (N, C-1, A): foreground classes; scores at or below the threshold cannot be picked, and
    # topk sorts each (image, class) row by decreasing score, so valid entries form a prefix.
    fg = scores[..., 1:].transpose(1, 2)
    k = min(topk_candidates, a)
    top_scores, top_anchors = fg.masked_fill(fg <= score_thresh, -1.0).topk(k, dim=2)
    valid = top_scores > score_thresh
    k = int(valid.sum(-1).max()) if valid.numel() else 0  # drop columns no row uses
    top_scores, top_anchors, valid = top_scores[..., :k], top_anchors[..., :k], valid[..., :k]
    image_index = torch.arange(n, device=boxes.device)[:, None, None]
    cand_boxes = boxes[image_index, top_anchors]  # (N, C-1, k, 4)
    keep = grouped_nms(cand_boxes.flatten(0, 1), valid.flatten(0, 1), nms_thresh).view(valid.shape)

    img, cls, rank = keep.nonzero(as_tuple=True)
    kept_scores = top_scores[img, cls, rank]
    # Order each image's detections by decreasing score (stable: ties keep class order).
    order = kept_scores.sort(descending=True, stable=True)[1]
    order = order[img[order].sort(stable=True)[1]]
    img, cls, rank, kept_scores = img[order], cls[order], rank[order], kept_scores[order]
    counts = torch.bincount(img, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    cap = (torch.arange(img.numel(), device=img.device) - starts[img]) < detections_per_img
    img, cls, rank, kept_scores = img[cap], cls[cap], rank[cap], kept_scores[cap]
    counts = counts.clamp(max=detections_per_img)

    out_boxes = cand_boxes[img, cls, rank]
    if scale_factors is not None:
        s = scale_factors.to(out_boxes)[img]
        out_boxes = out_boxes * torch.cat((s, s), dim=1)
    sizes = counts.tolist()
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(
            out_boxes.split(sizes), kept_scores.split(sizes), (cls + 1).split(sizes), strict=True
        )
    ]
