"""Writes LR-ASPP predictions: Cityscapes label-id PNGs, colour masks and overlays (paper §6.4).

:class:`SegmentationPredictionWriter` is a Lightning ``BasePredictionWriter`` callback for
``mnv3det predict``. For every image ``<rel>/<stem>.<ext>`` of the predict folder (``<rel>`` its
sub-folder, e.g. the city) it writes, each kind in its own tree:

* ``OUT/labelIds/<rel>/<stem>.png``: 8-bit PNG of Cityscapes *label ids* 0..33 (the ``id``
  column, e.g. road = 7, car = 26; not train ids: they are mapped back with
  :data:`mnv3det.data.cityscapes_labels.TRAINID_TO_ID`), at the image's original size: the format
  of the Cityscapes benchmark server and of cityscapesScripts' ``evalPixelLevelSemanticLabeling``;
* ``OUT/color/<rel>/<stem>.png``: the mask in the official Cityscapes palette;
* ``OUT/overlay/<rel>/<stem>.jpg``: the colour mask blended over the image.

Every kind can be switched off. For ``leftImg8bit/val`` the tree is::

    OUT/labelIds/frankfurt/frankfurt_000000_000294_leftImg8bit.png   <- evaluate this folder
    OUT/color/frankfurt/frankfurt_000000_000294_leftImg8bit.png
    OUT/overlay/frankfurt/frankfurt_000000_000294_leftImg8bit.jpg

The official evaluation finds the prediction of ground truth ``<city>_<seq>_<frame>_gtFine_labelIds.png``
by searching ``CITYSCAPES_RESULTS`` recursively for ``<city>_<seq>_<frame>*.png`` and stops when
it finds more than one, so point it at ``OUT/labelIds`` (``OUT`` itself holds the colour masks
under the same names)::

    mnv3det predict --config configs/lraspp_mnv3_large_cityscapes.yaml \
        --data.root /data/cityscapes --ckpt_path BEST.ckpt \
        --data.predict_dir /data/cityscapes/leftImg8bit/val
    CITYSCAPES_DATASET=/data/cityscapes CITYSCAPES_RESULTS=OUT/labelIds \
        csEvalPixelLevelSemanticLabeling

(``pip install cityscapesscripts``; it evaluates ``gtFine/val`` and reads the
``*_gtFine_instanceIds.png`` files for the iIoU. For the test set, zip ``OUT/labelIds`` for the
benchmark server.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from mnv3det.data.cityscapes_labels import colorize, train_ids_to_label_ids
from mnv3det.visualize.drawing import overlay


class SegmentationPredictionWriter(BasePredictionWriter):
    """Write label-id PNGs, colour masks and overlays for each predicted image.

    Args:
        output_dir: folder to write to (created).
        label_ids: write ``labelIds/`` (benchmark-server format).
        color: write ``color/`` palette masks.
        overlays: write ``overlay/`` blends.
        alpha: overlay opacity of the colour mask.
    """

    def __init__(
        self,
        output_dir: str | Path = "predictions",
        label_ids: bool = True,
        color: bool = True,
        overlays: bool = True,
        alpha: float = 0.5,
    ) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SegmentationPredictionWriter: alpha must be in [0, 1], got {alpha}")
        self.output_dir = Path(output_dir)
        self.label_ids = label_ids
        self.color = color
        self.overlays = overlays
        self.alpha = alpha
        self.written: list[Path] = []

    def _path(self, kind: str, file_name: str, suffix: str) -> Path:
        rel = Path(file_name)
        path = self.output_dir / kind / rel.parent / f"{rel.stem}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_item(self, item: dict[str, Any]) -> None:
        """Write the files of one ``predict_step`` item (``pred``, ``image``, ``file_name``)."""
        pred = np.asarray(item["pred"], dtype=np.uint8)
        name = str(item["file_name"])
        if self.label_ids:
            path = self._path("labelIds", name, ".png")
            Image.fromarray(train_ids_to_label_ids(pred)).save(path)
            self.written.append(path)
        if self.color or self.overlays:
            color = colorize(pred)
            if self.color:
                path = self._path("color", name, ".png")
                Image.fromarray(color).save(path)
                self.written.append(path)
            if self.overlays and item.get("image") is not None:
                path = self._path("overlay", name, ".jpg")
                Image.fromarray(overlay(np.asarray(item["image"]), color, self.alpha)).save(
                    path, quality=90
                )
                self.written.append(path)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Sequence[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for item in prediction:
            self.write_item(item)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        print(f"[predict] wrote {len(self.written)} files under {self.output_dir}")
        if self.label_ids:
            root = getattr(getattr(trainer, "datamodule", None), "root", None) or "CITYSCAPES_ROOT"
            print(
                "[predict] official evaluation (cityscapesscripts, ground truth gtFine/val): "
                f"CITYSCAPES_DATASET={root} CITYSCAPES_RESULTS={self.output_dir / 'labelIds'} "
                "csEvalPixelLevelSemanticLabeling"
            )


__all__ = ["SegmentationPredictionWriter"]
