"""Writes SSDLite predictions (``mnv3det predict``): a COCO results JSON, an images index and
optional pictures.

:class:`DetectionPredictionWriter` is a Lightning ``BasePredictionWriter`` for
:class:`mnv3det.tasks.detection.DetectionTask`. Under ``output_dir`` it writes

* ``detections.json``: the COCO results format, one entry per detection::

      [{"image_id": 1000001, "file_name": "000001000001.jpg", "category_id": 3,
        "bbox": [x, y, w, h], "score": 0.91}, ...]

  boxes in the original image pixels; labels become the data set's category ids through the data
  module's ``label_to_cat_id`` (identity when it has none). ``file_name`` is the image's path
  relative to the predicted folder (sub-folders included, ``/``-separated), so every result can be
  joined back to its file; ``pycocotools`` ignores the extra key. When the images are a COCO split
  (``--data.predict_dir`` unset, or a split's image folder with its annotation file),
  ``image_id`` is the COCO image id, so ``COCO(ann_file).loadRes("detections.json")`` and
  ``COCOeval`` work on the file as it is; for any other folder it is the image's position in the
  sorted file list.
* ``images.json``: the index of every predicted image (also those without detections), in the
  layout of COCO's image-info files::

      {"images": [{"id": 1000001, "file_name": "000001000001.jpg", "width": 640,
                   "height": 480}, ...],
       "categories": [{"id": 3, "name": "car"}, ...]}

* with ``draw=True``: ``images/<file name>.png``, each image with its detections above
  ``draw_score_thresh`` drawn by :func:`mnv3det.visualize.drawing.draw_detections` (boxes in
  class colours, ``"class score"`` labels on a filled background, kept inside the image); the
  sub-folders of the predicted folder are kept, so equal base names in
  different sub-folders do not overwrite each other.

Under DDP every rank's detections are gathered and rank 0 writes the files (images repeated by the
``DistributedSampler`` padding are written once). Images and results are sorted by image id.
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

from mnv3det.metrics.coco import detections_to_coco_results
from mnv3det.visualize.drawing import draw_detections

__all__ = ["DetectionPredictionWriter", "class_names_of"]


def class_names_of(trainer: L.Trainer) -> list[str] | None:
    """The data module's class names, else those stored in the checkpoint being used."""
    try:
        names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
    except (OSError, ValueError):  # no annotation file to read them from
        names = None
    if names is None:
        facts = getattr(trainer.lightning_module, "data_facts", None) or {}
        names = facts.get("class_names")
    return list(names) if names is not None else None


class DetectionPredictionWriter(BasePredictionWriter):
    """Write ``detections.json`` (COCO results with file names), ``images.json`` and pictures.

    Args:
        output_dir: output folder (created).
        draw: also write one PNG per image with its detections drawn.
        draw_score_thresh: smallest score drawn.
        json_name: name of the results file.
        images_name: name of the images index file.
    """

    def __init__(
        self,
        output_dir: str | Path = "predictions",
        draw: bool = False,
        draw_score_thresh: float = 0.3,
        json_name: str = "detections.json",
        images_name: str = "images.json",
    ) -> None:
        super().__init__(write_interval="batch_and_epoch")
        if json_name == images_name:
            raise ValueError(
                f"DetectionPredictionWriter: json_name and images_name are both {json_name!r}"
            )
        self.output_dir = Path(output_dir)
        self.draw = draw
        self.draw_score_thresh = draw_score_thresh
        self.json_name = json_name
        self.images_name = images_name
        self._results: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        self.dropped = 0
        self.written: Path | None = None
        self.images_written: Path | None = None

    def _label_to_cat_id(self, trainer: L.Trainer) -> dict[int, int] | None:
        """The data module's label -> category id map; when it cannot read one (no annotation
        file under ``data.root``), the map stored in the checkpoint being predicted with."""
        dm = getattr(trainer, "datamodule", None)
        try:
            mapping = getattr(dm, "label_to_cat_id", None)
        except (OSError, ValueError):
            mapping = None
        if mapping is None:
            facts = getattr(trainer.lightning_module, "data_facts", None) or {}
            mapping = facts.get("label_map")
        return {int(k): int(v) for k, v in mapping.items()} if mapping is not None else None

    def _categories(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """``[{"id", "name"}]`` of the data module's categories (empty when it has none)."""
        mapping = self._label_to_cat_id(trainer) or {}
        names = class_names_of(trainer) or []
        return [
            {"id": int(cat), "name": str(names[label]) if label < len(names) else str(cat)}
            for label, cat in sorted(mapping.items(), key=lambda item: item[1])
        ]

    @staticmethod
    def _image_info(prediction: dict[str, Any], image: torch.Tensor | None) -> dict[str, Any]:
        """``{"id", "file_name", "width", "height"}`` of one predicted image."""
        if "orig_size" in prediction:
            height, width = (int(v) for v in prediction["orig_size"])
        elif image is not None:
            height, width = int(image.shape[-2]), int(image.shape[-1])
        else:
            height = width = None
        image_id = int(prediction.get("image_id", -1))
        file_name = prediction.get("file_name")
        return {
            "id": image_id,
            "file_name": None if file_name is None else Path(str(file_name)).as_posix(),
            "width": width,
            "height": height,
        }

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
        images = batch[0]
        infos = [self._image_info(p, im) for im, p in zip(images, prediction, strict=True)]
        for info, pred in zip(infos, prediction, strict=True):
            results, dropped = detections_to_coco_results([info["id"]], [pred], mapping)
            self.dropped += dropped
            for result in results:
                result["file_name"] = info["file_name"]
            self._results.append((info, results))
        if self.draw:
            names = class_names_of(trainer)
            for image, pred, info in zip(images, prediction, infos, strict=True):
                rel = Path(info["file_name"] or str(info["id"]))
                path = self.output_dir / "images" / rel.parent / f"{rel.stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                picture = draw_detections(image, pred, names, self.draw_score_thresh)
                write_png(picture, str(path))

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
        by_id: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        for part in gathered:
            for info, dets in part:
                by_id.setdefault(info["id"], (info, dets))  # DistributedSampler padding repeats
        images = [by_id[i][0] for i in sorted(by_id)]
        results = [det for i in sorted(by_id) for det in by_id[i][1]]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.written = self.output_dir / self.json_name
        self.written.write_text(json.dumps(results))
        self.images_written = self.output_dir / self.images_name
        index = {"images": images, "categories": self._categories(trainer)}
        self.images_written.write_text(json.dumps(index, indent=1))
        print(
            f"[predict] wrote {len(results)} detections of {len(images)} images to "
            f"{self.written} (image index: {self.images_written})"
        )
