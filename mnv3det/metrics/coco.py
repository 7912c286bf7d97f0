"""COCO box mAP with pycocotools, correct under DDP (SSDLite evaluation, paper §6.3 / Table 6).

:class:`CocoMetric` is a torchmetrics ``Metric``: ``update(detections, targets)`` stores each
image's detections (boxes xyxy in the *original* image pixels, as the model returns them) in list
states; ``compute()`` first gathers every rank's states (torchmetrics concatenates list states
across processes), converts them to a COCO results list (label -> category id through the data
set's mapping, boxes xyxy -> xywh) and runs the official ``COCOeval`` against the data set's own
annotation file (so crowd regions and official areas are used exactly as in the COCO benchmark).
Hence 2 processes give the same numbers as 1.

Under DDP, Lightning's ``DistributedSampler`` pads the last batches with repeated images; every
stored image carries a (rank, sequence) tag and only the first copy of each image id is evaluated,
so repeated images are not counted twice.

All 12 ``COCOeval.stats`` are returned by name (:data:`STAT_NAMES`, torchmetrics' naming):
``map`` = AP@[.5:.95], ``map_50``, ``map_75``, ``map_small/medium/large``, ``mar_1/10/100``,
``mar_small/medium/large``. pycocotools reports -1 where a number is undefined (no ground truth
of that size). :func:`detections_to_coco_results` is the converter used by the metric and by the
prediction writer.

Besides the 12 numbers, every evaluation keeps COCOeval's own precision array
(:class:`CocoCurves`, ``CocoMetric.curves``): the precision-recall curves and the per-class AP
(:func:`per_class_ap`, computed as pycocotools and detectron2 do) come from it.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchmetrics import Metric
from torchvision.ops import box_convert

__all__ = [
    "STAT_NAMES",
    "CocoCurves",
    "CocoMetric",
    "coco_evaluate",
    "detections_to_coco_results",
    "format_ap_table",
    "per_class_ap",
]

STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


def detections_to_coco_results(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, Tensor]],
    label_to_cat_id: Mapping[int, int] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Convert model detections to a COCO results list.

    Args:
        image_ids: COCO image id of each image.
        detections: per image ``{"boxes": (D, 4) xyxy pixels, "scores": (D,), "labels": (D,)}``.
        label_to_cat_id: model label -> COCO category id (``None``: label is the id).

    Returns:
        ``(results, dropped)``: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``
        and the number of detections whose label has no category (e.g. an unused slot of
        torchvision's 91-class layout), which are left out.
    """
    results: list[dict[str, Any]] = []
    dropped = 0
    for image_id, det in zip(image_ids, detections, strict=True):
        boxes = box_convert(det["boxes"].detach().float().cpu(), "xyxy", "xywh").tolist()
        scores = det["scores"].detach().float().cpu().tolist()
        labels = det["labels"].detach().cpu().tolist()
        for box, score, label in zip(boxes, scores, labels, strict=True):
            cat = int(label) if label_to_cat_id is None else label_to_cat_id.get(int(label))
            if cat is None:
                dropped += 1
                continue
            results.append(
                {"image_id": int(image_id), "category_id": cat, "bbox": box, "score": score}
            )
    return results, dropped


@dataclass
class CocoCurves:
    """COCOeval's accumulated precision, with what its axes mean.

    Attributes:
        precision: ``COCOeval.eval["precision"]``, shape ``(T, R, K, A, M)``: IoU thresholds x
            101 recall thresholds x categories x area ranges (all, small, medium, large) x
            max-detections settings (1, 10, 100); -1 where a category has no ground truth.
        iou_thrs: the ``T`` IoU thresholds (0.50, 0.55, ..., 0.95).
        rec_thrs: the ``R`` recall thresholds (0, 0.01, ..., 1).
        cat_ids: the ``K`` category ids.
        cat_names: their names (from the annotation file).
        num_gt: non-crowd ground-truth boxes of each category in the evaluated images.
    """

    precision: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    cat_ids: list[int]
    cat_names: list[str]
    num_gt: list[int]


def per_class_ap(curves: CocoCurves) -> list[dict[str, Any]]:
    """AP@[.5:.95], AP50 and AP75 of each category, as pycocotools and detectron2 compute them.

    The AP of category ``k`` is the mean of ``precision[:, :, k, 0, -1]`` (every IoU threshold
    and recall threshold, area "all", 100 detections) over its entries > -1; NaN when the
    category has no ground truth in the evaluated images.

    Returns:
        One ``{"id", "name", "ap", "ap50", "ap75", "num_gt"}`` per category, in ``cat_ids`` order.
    """

    def mean(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else math.nan

    def at(iou: float) -> int:
        return int(np.argmin(np.abs(np.asarray(curves.iou_thrs) - iou)))

    rows = []
    for k, (cat, name) in enumerate(zip(curves.cat_ids, curves.cat_names, strict=True)):
        precision = curves.precision[:, :, k, 0, -1]
        rows.append(
            {
                "id": int(cat),
                "name": str(name),
                "ap": mean(precision),
                "ap50": mean(precision[at(0.5)]),
                "ap75": mean(precision[at(0.75)]),
                "num_gt": int(curves.num_gt[k]),
            }
        )
    return rows


def format_ap_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`per_class_ap` as a text table (AP in %, ``n/a`` without ground truth)."""
    width = max([18] + [len(str(r["name"])) + 2 for r in rows])
    header = f"{'class':<{width}} {'AP':>6} {'AP50':>6} {'AP75':>6} {'GT boxes':>9}"
    lines = [header, "-" * len(header)]

    def cell(value: float) -> str:
        return "   n/a" if value != value else f"{100 * value:6.1f}"  # NaN check

    for r in rows:
        lines.append(
            f"{r['name']!s:<{width}} {cell(r['ap'])} {cell(r['ap50'])} {cell(r['ap75'])} "
            f"{r['num_gt']:>9}"
        )
    return "\n".join(lines)


def _coco_eval(
    coco_gt: COCO, results: list[dict[str, Any]], image_ids: Sequence[int] | None = None
) -> tuple[dict[str, float], str, CocoCurves]:
    """:func:`coco_evaluate` plus COCOeval's precision array (:class:`CocoCurves`)."""
    if image_ids is None:
        image_ids = coco_gt.getImgIds()
    image_ids = sorted({int(i) for i in image_ids})
    unknown = [i for i in image_ids if i not in coco_gt.imgs]
    if unknown:
        raise KeyError(
            f"CocoMetric: image ids {unknown[:5]} are not in the annotation file; evaluate "
            "predictions against the annotation file of the images they were made on"
        )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset.get("images", [])),
                "categories": list(coco_gt.dataset.get("categories", [])),
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}
    params = evaluator.params
    cat_ids = [int(c) for c in params.catIds]
    curves = CocoCurves(
        precision=np.asarray(evaluator.eval["precision"]),
        iou_thrs=np.asarray(params.iouThrs),
        rec_thrs=np.asarray(params.recThrs),
        cat_ids=cat_ids,
        cat_names=[str(coco_gt.cats[c].get("name", c)) for c in cat_ids],
        num_gt=[
            len(coco_gt.getAnnIds(imgIds=image_ids, catIds=[c], iscrowd=False)) for c in cat_ids
        ],
    )
    return stats, summary.getvalue(), curves


def coco_evaluate(
    coco_gt: COCO, results: list[dict[str, Any]], image_ids: Sequence[int] | None = None
) -> tuple[dict[str, float], str]:
    """Run pycocotools' ``COCOeval`` (bbox) on ``results``.

    Args:
        coco_gt: ground truth (e.g. ``CocoDetection.coco``).
        results: COCO results list (may be empty: every AP is then 0).
        image_ids: evaluate only these images (default: every image of ``coco_gt``).

    Returns:
        ``({name: value for the 12 stats}, the printed summary table)``.
    """
    stats, summary, _ = _coco_eval(coco_gt, results, image_ids)
    return stats, summary


class CocoMetric(Metric):
    """COCO bbox mAP (pycocotools) that gathers every rank's detections before evaluating.

    Args:
        coco_gt: the ground-truth annotations (``CocoDetection.coco``).
        label_to_cat_id: model label -> category id (``CocoDetection.label_to_cat_id``);
            ``None`` when labels are category ids.

    After :meth:`compute`, ``summary`` holds pycocotools' printed table, ``curves`` COCOeval's
    precision array (:class:`CocoCurves`) and ``dropped_detections`` the detections whose label
    had no category.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        coco_gt: COCO,
        label_to_cat_id: Mapping[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.coco_gt = coco_gt
        self.label_to_cat_id = dict(label_to_cat_id) if label_to_cat_id is not None else None
        # One row per image: (image id, tag); one row per detection: its image's tag.
        self.add_state("image_rows", default=[], dist_reduce_fx="cat")
        self.add_state("det_tags", default=[], dist_reduce_fx="cat")
        self.add_state("det_boxes", default=[], dist_reduce_fx="cat")
        self.add_state("det_scores", default=[], dist_reduce_fx="cat")
        self.add_state("det_labels", default=[], dist_reduce_fx="cat")
        self._sequence = 0
        self.summary = ""
        self.curves: CocoCurves | None = None
        self.dropped_detections = 0

    def _rank_and_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def update(
        self,
        detections: Sequence[Mapping[str, Tensor]],
        targets: Sequence[Mapping[str, Any]] | Sequence[int],
    ) -> None:
        """Store one batch.

        Args:
            detections: per image ``{"boxes" xyxy original pixels, "scores", "labels"}``.
            targets: per image a dict with ``"image_id"`` (the data set's targets), or the ids.
        """
        if len(detections) != len(targets):
            raise ValueError(
                f"CocoMetric.update: {len(detections)} detections but {len(targets)} targets"
            )
        rank, world = self._rank_and_world()
        device = self.device
        for det, target in zip(detections, targets, strict=True):
            image_id = int(target["image_id"] if isinstance(target, Mapping) else target)
            tag = self._sequence * world + rank  # unique over ranks, increasing with order
            self._sequence += 1
            self.image_rows.append(
                torch.tensor([[image_id, tag]], dtype=torch.int64, device=device)
            )
            n = len(det["boxes"])
            self.det_tags.append(torch.full((n,), tag, dtype=torch.int64, device=device))
            self.det_boxes.append(det["boxes"].detach().float().reshape(-1, 4).to(device))
            self.det_scores.append(det["scores"].detach().float().reshape(-1).to(device))
            self.det_labels.append(det["labels"].detach().reshape(-1).long().to(device))

    @staticmethod
    def _cat(values: list[Tensor] | Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if isinstance(values, Tensor):  # already concatenated by the DDP sync
            return values.cpu()
        return torch.cat([v.cpu() for v in values]) if values else torch.zeros(shape, dtype=dtype)

    def compute(self) -> dict[str, float]:
        """Gathered over ranks (by torchmetrics), deduplicated, then ``COCOeval``."""
        rows = self._cat(self.image_rows, (0, 2), torch.int64)
        tags = self._cat(self.det_tags, (0,), torch.int64)
        boxes = self._cat(self.det_boxes, (0, 4), torch.float32)
        scores = self._cat(self.det_scores, (0,), torch.float32)
        labels = self._cat(self.det_labels, (0,), torch.int64)
        # First copy of each image id wins (DistributedSampler repeats images to even out ranks).
        first_tag: dict[int, int] = {}
        for image_id, tag in sorted(rows.tolist(), key=lambda r: r[1]):
            first_tag.setdefault(image_id, tag)
        chosen = set(first_tag.values())
        tag_to_image = {tag: image_id for image_id, tag in first_tag.items()}
        keep = torch.tensor([t in chosen for t in tags.tolist()], dtype=torch.bool)
        tags, boxes, scores, labels = tags[keep], boxes[keep], scores[keep], labels[keep]
        # Group the detections by image tag.
        order = torch.argsort(tags, stable=True)
        unique_tags, counts = torch.unique_consecutive(tags[order], return_counts=True)
        sizes = counts.tolist()
        dets = [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(
                boxes[order].split(sizes),
                scores[order].split(sizes),
                labels[order].split(sizes),
                strict=True,
            )
        ]
        image_ids = [tag_to_image[int(t)] for t in unique_tags]
        results, self.dropped_detections = detections_to_coco_results(
            image_ids, dets, self.label_to_cat_id
        )
        stats, self.summary, self.curves = _coco_eval(self.coco_gt, results, list(first_tag))
        return stats

    def reset(self) -> None:
        super().reset()
        self._sequence = 0
