"""``PlotWriter``: the charts and picture sheets of a run, as PNGs in its folder.

Add it to a config's ``trainer.callbacks`` (the shipped configs do). After every validation
(sanity checks aside) and at the end of ``fit`` it writes, under ``<run folder>/plots/``
(``trainer.log_dir``, e.g. ``logs/ssdlite320_mnv3_large_coco/version_3/plots/``), where
Ultralytics users look for them:

* detection (:class:`~mnv3det.tasks.detection.DetectionTask`): ``PR_curve.png`` (COCOeval's
  precision-recall curve per class at IoU 0.5, from its own precision array),
  ``per_class_AP.png`` and ``per_class_AP.csv`` (AP, AP50, AP75 per class, computed as
  pycocotools/detectron2 do; the table is also printed after ``validate``);
* segmentation (:class:`~mnv3det.tasks.segmentation.SegmentationTask`): ``IoU_per_class.png``
  and ``confusion_matrix_normalized.png`` (rows = ground truth, each summing to 1);
* with ``draw: true``: ``val_predictions.png``, the first ``num_images`` validation images with
  ground truth beside prediction (:mod:`mnv3det.visualize.drawing`);
* ``results.png``: the curves of the run's ``metrics.csv`` (Lightning's CSV logger), rewritten
  after each validation and at the end of ``fit``.

``mnv3det test`` writes the same charts with a ``test_`` prefix (``test_predictions.png``). Only rank 0 writes; the charts
cover every rank's data (the metrics are gathered first), the picture sheet rank 0's images. A
chart that cannot be drawn is reported as a warning: it never stops a training run.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_warn

from mnv3det.data.cityscapes_labels import CLASS_NAMES, PALETTE
from mnv3det.metrics.coco import format_ap_table, per_class_ap
from mnv3det.tasks.folders import run_folder
from mnv3det.visualize import charts
from mnv3det.visualize.drawing import DETECTION_PALETTE, detection_sheet, segmentation_sheet

__all__ = ["PlotWriter", "segmentation_palette"]


def segmentation_palette(class_names: Sequence[str]) -> np.ndarray:
    """The Cityscapes colours for the 19 Cityscapes classes, else distinct colours per class."""
    if tuple(class_names) == CLASS_NAMES:
        return PALETTE
    return np.asarray(
        [DETECTION_PALETTE[k % len(DETECTION_PALETTE)] for k in range(len(class_names))],
        dtype=np.uint8,
    )


class PlotWriter(Callback):
    """Write evaluation charts, prediction sheets and training curves as PNGs.

    Args:
        dirpath: folder for the PNGs (default: ``<trainer.log_dir>/plots``).
        draw: also draw a sheet of validation images (ground truth beside prediction).
        num_images: images on that sheet (taken from the first validation batches).
        score_thresh: smallest detection score drawn on the sheet.
        sheet_name: file name of the sheet.
        curves: write ``results.png`` from the run's ``metrics.csv``.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        draw: bool = True,
        num_images: int = 8,
        score_thresh: float = 0.3,
        sheet_name: str = "val_predictions.png",
        curves: bool = True,
    ) -> None:
        super().__init__()
        if num_images < 0:
            raise ValueError(f"PlotWriter: num_images must be >= 0, got {num_images}")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.draw = draw
        self.num_images = num_images
        self.score_thresh = score_thresh
        self.sheet_name = sheet_name
        self.curves = curves
        self.written: dict[str, Path] = {}
        """Every file written so far, by file name (the newest path of each)."""
        self._images: list[Any] = []
        self._targets: list[Any] = []

    # ----------------------------------------------------------------- folders
    def plot_dir(self, trainer: L.Trainer) -> Path:
        """The folder the PNGs go to."""
        if self.dirpath is not None:
            return self.dirpath
        return run_folder(trainer) / "plots"

    def _record(self, path: Path) -> None:
        self.written[path.name] = path

    # ------------------------------------------------------- collecting images
    def _collect(self, trainer: L.Trainer, batch: Any, dataloader_idx: int) -> None:
        if not self.draw or trainer.sanity_checking or dataloader_idx != 0:
            return
        if not trainer.is_global_zero or len(self._images) >= self.num_images:
            return
        images, targets = batch[0], batch[1]
        for image, target in zip(images, targets, strict=False):
            if len(self._images) >= self.num_images:
                break
            if isinstance(target, dict):
                target = {
                    k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in target.items()
                }
                if target.get("skipped"):
                    continue
            else:
                target = target.detach().cpu()
            self._images.append(image.detach().cpu())
            self._targets.append(target)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images, self._targets = [], []

    on_test_start = on_validation_start

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(trainer, batch, dataloader_idx)

    on_test_batch_end = on_validation_batch_end

    # ----------------------------------------------------------------- writing
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        written = self._evaluation(trainer, pl_module, "val", "")
        fitting = trainer.state.fn == "fit"
        if fitting and self.curves:
            written += self._results(trainer)
        if not fitting:
            self._report(written)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._report(self._evaluation(trainer, pl_module, "test", "test_"))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.curves:
            self._results(trainer)
        self._report(list(self.written.values()))

    def print_written(self, captions: dict[str, str], prefix: str = "[demo] picture:") -> None:
        """Print the path of each written file named in ``captions``, with its caption."""
        for name, caption in captions.items():
            if name in self.written:
                print(f"{prefix} {self.written[name]} ({caption})")

    def _report(self, paths: Sequence[Path]) -> None:
        if paths:
            folder = paths[0].parent
            names = ", ".join(sorted({p.name for p in paths}))
            print(f"[plots] {folder}: {names}")

    def _safely(self, what: str, function: Any, *args: Any) -> list[Path]:
        """Run one drawing function; a failure becomes a warning (training goes on)."""
        try:
            out = function(*args)
        except Exception as err:  # a chart must never stop a run
            rank_zero_warn(f"PlotWriter: could not write {what}: {type(err).__name__}: {err}")
            return []
        paths = [p for p in (out if isinstance(out, list) else [out]) if isinstance(p, Path)]
        for path in paths:
            self._record(path)
        return paths

    def _evaluation(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, prefix: str
    ) -> list[Path]:
        folder = self.plot_dir(trainer)
        written: list[Path] = []
        curves = getattr(pl_module, "last_curves", {}).get(stage)
        if curves is not None:
            written += self._safely(
                "the COCO charts", self._detection_charts, trainer, curves, folder, prefix
            )
        results = getattr(pl_module, "last_results", None)
        if isinstance(results, dict) and "confmat" in results:
            written += self._safely(
                "the segmentation charts",
                self._segmentation_charts,
                pl_module,
                results,
                folder,
                prefix,
            )
        if self.draw and self._images:
            name = self.sheet_name if not prefix else prefix + self.sheet_name.removeprefix("val_")
            sheet = folder / name
            written += self._safely("the prediction sheet", self._sheet, trainer, pl_module, sheet)
        self._images, self._targets = [], []
        return written

    def _detection_charts(
        self, trainer: L.Trainer, curves: Any, folder: Path, prefix: str
    ) -> list[Path]:
        rows = per_class_ap(curves)
        pr = charts.plot_pr_curves(curves, folder / f"{prefix}PR_curve.png")
        bars = charts.plot_per_class_ap(rows, folder / f"{prefix}per_class_AP.png")
        table = folder / f"{prefix}per_class_AP.csv"
        with open(table, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["id", "name", "ap", "ap50", "ap75", "num_gt"])
            writer.writeheader()
            writer.writerows(rows)
        if trainer.state.fn != "fit":
            print(f"[plots] AP per class (%):\n{format_ap_table(rows)}")
        return [pr, bars, table]

    def _segmentation_charts(
        self, pl_module: L.LightningModule, results: dict[str, Any], folder: Path, prefix: str
    ) -> list[Path]:
        names = list(getattr(pl_module, "class_names", []))
        iou = torch.as_tensor(results["iou"]).tolist()
        if len(names) != len(iou):
            names = [f"class{i}" for i in range(len(iou))]
        bars = charts.plot_iou(iou, names, folder / f"{prefix}IoU_per_class.png")
        matrix = folder / f"{prefix}confusion_matrix_normalized.png"
        charts.plot_confusion_matrix(torch.as_tensor(results["confmat"]).numpy(), names, matrix)
        return [bars, matrix]

    @torch.no_grad()
    def _sheet(self, trainer: L.Trainer, pl_module: L.LightningModule, path: Path) -> Path:
        training = pl_module.training
        pl_module.eval()
        try:
            images = [image.to(pl_module.device) for image in self._images]
            if hasattr(pl_module, "last_curves"):  # detection: boxes
                from mnv3det.tasks.detection_writer import class_names_of

                detections = [{k: v.cpu() for k, v in d.items()} for d in pl_module(images)]
                samples = list(zip(self._images, self._targets, detections, strict=True))
                sheet = detection_sheet(samples, class_names_of(trainer), self.score_thresh)
            else:  # segmentation: masks
                infer = getattr(pl_module, "infer", pl_module)
                preds = [infer(image[None]).argmax(1)[0].cpu() for image in images]
                names = list(getattr(pl_module, "class_names", []))
                samples = list(zip(self._images, self._targets, preds, strict=True))
                ignore = int(getattr(pl_module, "ignore_index", 255))
                sheet = segmentation_sheet(samples, names, segmentation_palette(names), ignore)
        finally:
            pl_module.train(training)
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)
        return path

    def _results(self, trainer: L.Trainer) -> list[Path]:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
                metrics = Path(logger.experiment.metrics_file_path)
                if metrics.is_file():
                    out = self.plot_dir(trainer) / "results.png"
                    return self._safely("results.png", charts.plot_results, metrics, out)
        return []
