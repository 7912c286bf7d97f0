"""SSD post-processing, dense and batched (SSD, Liu et al. 2016, §3.1 "inference";
MobileNetV3 paper §6.3 uses it unchanged).

torchvision's ``SSD.postprocess_detections`` loops over images and, inside, over classes. Here
the whole batch is one computation on fixed-shape tensors: softmax, box decoding and clipping,
the per-(image, class) score threshold and top-k as **one** ``topk`` on an ``(N, classes,
anchors)`` tensor, NMS for every (image, class) group at once (:func:`heads.nms.nms_keep_mask`,
a keep mask), and each image's best ``detections_per_img`` as one ``topk``. The same function
serves the eager model, the fast inference path and the ONNX graph (it traces: no
data-dependent shapes), so there is one implementation to keep equal to torchvision's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from heads.nms import nms_keep_mask

__all__ = ["decode_boxes", "dense_postprocess", "dense_to_list", "postprocess_detections"]

#: torchvision's ``BoxCoder`` clamp of dw/dh before ``exp`` (``log(1000 / 16)``).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def decode_boxes(
    rel_codes: Tensor,
    anchors: Tensor,
    weights: Sequence[float],
    image_size: tuple[int, int],
) -> Tensor:
    """Decode box offsets against anchors and clip to the image, broadcast over the batch.

    The arithmetic is torchvision's ``BoxCoder.decode_single`` followed by
    ``clip_boxes_to_image`` (same operations and association), without repeating the anchors
    for every image.

    Args:
        rel_codes: ``(N, A, 4)`` encoded offsets ``(dx, dy, dw, dh)``.
        anchors: ``(A, 4)`` xyxy.
        weights: the coder's ``(wx, wy, ww, wh)`` (SSD: 10, 10, 5, 5).
        image_size: ``(H, W)`` to clip to.

    Returns:
        ``(N, A, 4)`` xyxy boxes.
    """
    anchors = anchors.to(rel_codes.dtype)
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ctr_x, ctr_y = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    wx, wy, ww, wh = (float(w) for w in weights)
    dx, dy = rel_codes[..., 0] / wx, rel_codes[..., 1] / wy
    dw = (rel_codes[..., 2] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (rel_codes[..., 3] / wh).clamp(max=BBOX_XFORM_CLIP)
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    h, w = image_size
    return torch.stack(
        (
            (pred_ctr_x - half_w).clamp(min=0, max=w),
            (pred_ctr_y - half_h).clamp(min=0, max=h),
            (pred_ctr_x + half_w).clamp(min=0, max=w),
            (pred_ctr_y + half_h).clamp(min=0, max=h),
        ),
        dim=-1,
    )


def _tracing() -> bool:
    """Whether an exporter / compiler traces this (then only fixed-shape tensor code runs)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _select_like_torchvision(
    fg: Tensor, masked: Tensor, score_thresh: float, top_scores: Tensor, top_anchor: Tensor
) -> None:
    """Per-(image, class) candidates chosen among exactly equal scores as torchvision does.

    torchvision takes ``score[score > thresh].topk(k)`` per class; the dense ``topk`` over the
    whole masked row computes the same values, but ``topk`` orders (and, at the k-th place,
    picks among) exactly equal scores depending on the tensor it sorts. Rows with all anchors
    above the threshold are the same tensor; the few rows with a tie among their valid
    candidates and some anchors below the threshold are recomputed torchvision's way, in place.

    Args:
        fg: ``(N, classes, A)`` scores.
        masked: ``fg`` with the scores at or below ``score_thresh`` set to ``-1``.
        score_thresh: minimum score of a candidate.
        top_scores: ``(N, classes, k)`` ``masked.topk(k)`` values (updated in place).
        top_anchor: its indices (updated in place).
    """
    k = top_scores.shape[2]
    tied = (
        (top_scores[..., 1:] == top_scores[..., :-1]) & (top_scores[..., 1:] > score_thresh)
    ).any(2)
    if k < masked.shape[2]:
        # A tie at the k-th place: more than k valid scores at least the k-th value (this
        # replaces a second topk(k + 1) over the rows).
        kth = top_scores[..., -1:]
        tied |= (kth[..., 0] > score_thresh) & ((masked >= kth).sum(2) > k)
    n_valid = (masked > score_thresh).sum(2)
    for i, j in (tied & (n_valid < fg.shape[2])).nonzero().tolist():
        row = fg[i, j]
        valid = (row > score_thresh).nonzero().squeeze(1)
        values, order = row[valid].topk(min(k, valid.numel()))
        top_scores[i, j, : values.numel()] = values
        top_anchor[i, j, : values.numel()] = valid[order]


def _rank_like_torchvision(
    kept_scores: Tensor, keep: Tensor, top_scores: Tensor, d: int
) -> tuple[Tensor, Tensor]:
    """Each image's ``d`` best kept candidates, exactly equal scores ordered as torchvision.

    torchvision's ``batched_nms`` sorts the kept scores of an image in (class, rank) order:
    with more than 1,000 candidates by an unstable ``sort`` of that compact list (its
    per-class path), else through one ``nms`` call (a stable sort). The same sort of the same
    list gives the same order among ties; ``topk`` over the padded ``(N, classes * K)`` tensor
    would not.

    Returns:
        ``(scores (N, d), index (N, d))`` as ``kept_scores.topk(d)`` would (``-1`` padding).
    """
    n = kept_scores.shape[0]
    scores = kept_scores.new_full((n, d), -1.0)
    index = torch.zeros((n, d), dtype=torch.long, device=kept_scores.device)
    candidates = (top_scores.view(n, -1) > -1.0).sum(1).tolist()
    for i in range(n):
        positions = keep[i].nonzero().squeeze(1)
        values = kept_scores[i, positions]
        ranked, order = values.sort(descending=True, stable=candidates[i] <= 1000)
        m = min(d, ranked.numel())
        scores[i, :m], index[i, :m] = ranked[:m], positions[order[:m]]
    return scores, index


def _keep_best(
    boxes: Tensor, top_scores: Tensor, iou: float, score_thresh: float, d: int
) -> Tensor:
    """NMS keep mask that is exact for every box that can reach an image's ``d`` best.

    The output of SSD post-processing is each image's ``d`` best *kept* candidates, and
    greedy NMS decides a box from the higher-scoring boxes of its group only. So NMS runs on
    the candidates scoring at least each image's ``m``-th best score (ties at that score
    included, so every group's subset is a prefix of its sorted row and its keep flags are
    those of a full NMS). When an image keeps at least ``d`` of them and its ``d``-th and
    ``d + 1``-th kept scores differ, its ``d`` best are final: every candidate left out scores
    lower. Otherwise ``m`` grows; a tie at the ``d``-th place among the subset's kept boxes is
    final, and then all candidates go through NMS so that the tie is broken as torchvision
    breaks it (by sorting the image's whole kept list). Exactly equal scores *inside* the ``d``
    best are the same detections as torchvision's but may be listed in another order (its
    order among them is that of an unstable sort of the whole list). With 90 classes x 300 candidates
    (27,000 boxes) and ``d = 300``, NMS on the first ``m = 3d`` boxes takes about 1 ms where
    the full keep mask takes 6-17 ms on 2 cores; 45-85 % of them are kept on the benchmark's
    score distributions, so one round suffices (``docs/deployment.md``).

    Args:
        boxes: ``(N * G, K, 4)`` candidate boxes (``G`` groups per image).
        top_scores: ``(N, G, K)`` scores, each row sorted in decreasing order, ``-1`` padding.
        iou: NMS IoU threshold.
        score_thresh: scores at or below it are not candidates.
        d: detections per image (at most ``G * K``).

    Returns:
        ``(N * G, K)`` bool: the full NMS keep flags of every candidate scoring at least the
        image's cut-off, False for the others.
    """
    n = top_scores.shape[0]
    flat = top_scores.reshape(n, -1)
    per_image = (flat > score_thresh).sum(1)
    total = int(per_image.max())
    m = min(3 * d, total)  # 3d: one round on the benchmark's score distributions
    while True:
        cut = flat.topk(max(m, 1), dim=1).values[:, -1:]  # (N, 1): each image's m-th score
        subset = torch.where(flat >= cut, flat, -1.0)
        keep = nms_keep_mask(boxes, subset.view(-1, boxes.shape[1]), iou, score_thresh)
        if m >= total:
            return keep
        kept = torch.where(keep.view(n, -1), flat, -1.0)
        best = kept.topk(min(d + 1, kept.shape[1]), dim=1).values
        counts = (best > score_thresh).sum(1)
        tie = torch.zeros_like(counts, dtype=torch.bool)
        if best.shape[1] > d:  # the d-th and (d+1)-th kept scores are equal
            tie = (best[:, d - 1] == best[:, d]) & (best[:, d] > score_thresh)
        done = (per_image <= m) | ((counts >= d) & ~tie)
        if bool(done.all()):
            return keep
        if bool((counts[~done] > d).all()):  # only final ties left: the full NMS decides
            m = total
            continue
        short = int(counts[~done].min().clamp(min=1))
        m = min(total, max(2 * m, -(-m * (d + 1) * 5 // (4 * short))))


def dense_postprocess(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    image_size: tuple[int, int],
    box_coder_weights: Sequence[float],
    score_thresh: float = 0.001,
    nms_thresh: float = 0.55,
    topk_candidates: int = 300,
    detections_per_img: int = 300,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's SSD post-processing on fixed-shape tensors (exportable).

    Per image and class: scores above ``score_thresh``, then the ``topk_candidates`` best; NMS
    per (image, class) with ``nms_thresh``; the ``detections_per_img`` best of each image.

    Args:
        cls_logits: ``(N, A, C)`` (class 0 = background).
        bbox_regression: ``(N, A, 4)``.
        anchors: ``(A, 4)`` xyxy in network-input pixels (the same for every image).
        image_size: ``(H, W)`` of the network input; boxes are clipped to it.
        box_coder_weights: ``(wx, wy, ww, wh)`` of the box coder.
        score_thresh: minimum class probability.
        nms_thresh: IoU threshold of NMS.
        topk_candidates: candidates per (image, class) before NMS.
        detections_per_img: output rows ``D`` per image (fewer when there are fewer candidates).
        scale: optional factors broadcastable to ``(N, D, 4)`` (e.g. ``(N, 1, 4)`` or ``(4,)``)
            that map boxes from the network input to the original image pixels.

    Returns:
        ``(boxes (N, D, 4), scores (N, D), labels (N, D) int64, num_detections (N,))``: each
        image's rows sorted by decreasing score; rows past ``num_detections`` are zeros.
    """
    n, a, c = cls_logits.shape
    boxes = decode_boxes(bbox_regression, anchors, box_coder_weights, image_size)
    # (N, C-1, A): foreground classes; scores at or below the threshold cannot be picked, and
    # topk sorts each (image, class) row, so a row's valid candidates come first.
    fg = F.softmax(cls_logits, dim=-1)[..., 1:].transpose(1, 2)
    k = min(topk_candidates, a)
    masked = fg.masked_fill(fg <= score_thresh, -1.0)
    top_scores, top_anchor = masked.topk(k, dim=2)
    if not _tracing():
        _select_like_torchvision(fg, masked, score_thresh, top_scores, top_anchor)
    offsets = (torch.arange(n, device=boxes.device) * a).view(n, 1, 1)
    cand_boxes = boxes.reshape(-1, 4)[(top_anchor + offsets).reshape(-1)]  # (N*(C-1)*K, 4)
    d = min(detections_per_img, (c - 1) * k)
    if _tracing():
        keep = nms_keep_mask(
            cand_boxes.view(-1, k, 4), top_scores.reshape(-1, k), nms_thresh, score_thresh
        )
    else:
        keep = _keep_best(cand_boxes.view(-1, k, 4), top_scores, nms_thresh, score_thresh, d)
    kept_scores = torch.where(keep.view(n, -1), top_scores.view(n, -1), -1.0)
    if _tracing():
        scores, index = kept_scores.topk(d, dim=1)
    else:
        scores, index = _rank_like_torchvision(kept_scores, keep.view(n, -1), top_scores, d)
    valid = scores > score_thresh
    labels = torch.div(index, k, rounding_mode="floor") + 1
    out_boxes = cand_boxes.view(n, -1, 4).gather(1, index.unsqueeze(-1).expand(n, d, 4))
    if scale is not None:
        out_boxes = out_boxes * scale
    return (
        torch.where(valid.unsqueeze(-1), out_boxes, 0.0),
        torch.where(valid, scores, 0.0),
        torch.where(valid, labels, 0),
        valid.sum(dim=1),
    )


def dense_to_list(
    boxes: Tensor, scores: Tensor, labels: Tensor, num_detections: Tensor
) -> list[dict[str, Tensor]]:
    """Per-image ``{"boxes", "scores", "labels"}`` dicts (torchvision's format) from the dense
    outputs of :func:`dense_postprocess` (or an ONNX session's numpy arrays)."""
    boxes, scores = torch.as_tensor(boxes), torch.as_tensor(scores)
    labels, num_detections = torch.as_tensor(labels), torch.as_tensor(num_detections)
    return [
        {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
        for i, n in enumerate(num_detections.tolist())
    ]


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
    """Detections per image, as torchvision's ``SSD.postprocess_detections`` returns them.

    :func:`dense_postprocess` (batched over images and classes) split into per-image dicts.

    Args:
        cls_logits: ``(N, A, C)``.
        bbox_regression: ``(N, A, 4)``.
        anchors: ``(A, 4)`` xyxy in input pixels (the same for every image of the batch).
        image_size: ``(H, W)`` of the network input; boxes are clipped to it.
        box_coder: its ``weights`` decode the offsets.
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
    scale = None
    if scale_factors is not None:
        scale = scale_factors.to(bbox_regression).repeat(1, 2).unsqueeze(1)  # (N, 1, 4)
    return dense_to_list(
        *dense_postprocess(
            cls_logits,
            bbox_regression,
            anchors,
            image_size,
            box_coder.weights,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            topk_candidates=topk_candidates,
            detections_per_img=detections_per_img,
            scale=scale,
        )
    )
