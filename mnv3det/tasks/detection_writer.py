"""Writes SSDLite predictions (``mnv3det predict``): a COCO results JSON and optional pictures.

:class:`DetectionPredictionWriter` is a Lightning ``BasePredictionWriter`` for
:class:`mnv3det.tasks.detection.DetectionTask`:

* ``{output_dir}/detections.json``: the COCO results format
  (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``, boxes in the original image
  pixels), which ``pycocotools``' ``COCO.loadRes`` and the COCO evaluation server read. Labels
  become category ids through the data module's ``label_to_cat_id`` (identity when it has none).
  Under DDP every rank's detections are gathered and rank 0 writes one file (images repeated by
  the ``DistributedSampler`` padding are written once).
* with ``draw=True``: ``{output_dir}/images/<file stem>.png``, each image with its detections
  above ``draw_score_thresh`` drawn by ``torchvision.utils.draw_bounding_boxes`` (class name and
  score as the label).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from mnv3det.metrics.coco import detections_to_coco_results

__all__ = ["DetectionPredictionWriter", "draw_detections"]


def draw_detections(
    image: torch.Tensor,
    detections: dict[str, torch.Tensor],
    class_names: Sequence[str] | None = None,
    score_thresh: float = 0.3,
    width: int = 2,
) -> torch.Tensor:
    """Draw boxes with ``"name score"`` labels on a ``[0, 1]`` float or uint8 ``(3, H, W)`` image.

    Returns:
        ``(3, H, W)`` uint8 image.
    """
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    keep = detections["scores"] >= score_thresh
    boxes = detections["boxes"][keep].detach().cpu()
    labels = detections["labels"][keep].tolist()
    scores = detections["scores"][keep].tolist()
    if len(boxes) == 0:
        return image.cpu()
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # fmt: skip
    names = [
        f"{class_names[lab] if class_names and lab < len(class_names) else lab} {s:.2f}"
        for lab, s in zip(labels, scores, strict=True)
    ]
    colors = [palette[lab % len(palette)] for lab in labels]
    return draw_bounding_boxes(image.cpu(), boxes, labels=names, colors=colors, width=width)


class DetectionPredictionWriter(BasePredictionWriter):
    """Write ``detections.json`` (COCO results) and, optionally, pictures with boxes.

    Args:
        output_dir: output folder (created).
        draw: also write one PNG per image with its detections drawn.
        draw_score_thresh: smallest score drawn.
        json_name: name of the results file.
    """

    def __init__(
        self,
        output_dir: str | Path = "predictions",
        draw: bool = False,
        draw_score_thresh: float = 0.3,
        json_name: str = "detections.json",
    ) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.output_dir = Path(output_dir)
        self.draw = draw
        self.draw_score_thresh = draw_score_thresh
        self.json_name = json_name
        self._results: list[tuple[int, list[dict[str, Any]]]] = []
        self.dropped = 0
        self.written: Path | None = None

    def _label_to_cat_id(self, trainer: L.Trainer) -> dict[int, int] | None:
        dm = getattr(trainer, "datamodule", None)
        mapping = getattr(dm, "label_to_cat_id", None)
        return dict(mapping) if mapping is not None else None

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._results = []

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        mapping = self._label_to_cat_id(trainer)
        ids = [int(p.get("image_id", -1)) for p in prediction]
        results, dropped = detections_to_coco_results(ids, prediction, mapping)
        self.dropped += dropped
        for image_id in ids:
            self._results.append((image_id, [r for r in results if r["image_id"] == image_id]))
        if self.draw:
            dm = getattr(trainer, "datamodule", None)
            names = getattr(dm, "class_names", None)
            folder = self.output_dir / "images"
            folder.mkdir(parents=True, exist_ok=True)
            images = batch[0]
            for index, (image, pred) in enumerate(zip(images, prediction, strict=True)):
                stem = Path(str(pred.get("file_name", f"{pred.get('image_id', index)}"))).stem
                picture = draw_detections(image, pred, names, self.draw_score_thresh)
                write_png(picture, str(folder / f"{stem}.png"))

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        gathered = [self._results]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self._results)
        if trainer.global_rank != 0:
            return
        seen: set[int] = set()
        results: list[dict[str, Any]] = []
        for part in gathered:
            for image_id, dets in part:
                if image_id in seen:  # DistributedSampler padding repeats images
                    continue
                seen.add(image_id)
                results.extend(dets)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.written = self.output_dir / self.json_name
        self.written.write_text(json.dumps(results))
        print(f"[predict] wrote {len(results)} detections of {len(seen)} images to {self.written}")
