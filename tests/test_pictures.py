"""Pictures and charts: detection/segmentation sheets, legends, COCO PR curves and per-class AP,
IoU bars, the normalised confusion matrix, training curves and the PlotWriter callback."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from mnv3det.data.cityscapes import CityscapesSegmentation, collate_segmentation
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.metrics.coco import CocoMetric, _coco_eval, format_ap_table, per_class_ap
from mnv3det.tasks.detection import DetectionTask
from mnv3det.tasks.detection_data import CocoDataModule
from mnv3det.tasks.plots import PlotWriter
from mnv3det.tasks.segmentation import SegmentationTask
from mnv3det.visualize import charts
from mnv3det.visualize.drawing import (
    _label_spot,
    class_color,
    detection_sheet,
    draw_boxes,
    draw_detections,
    legend,
    segmentation_sheet,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        callbacks=callbacks, **kwargs,
    )  # fmt: skip


# ---------------------------------------------------------------- drawing


def test_labels_stay_inside_the_image_and_avoid_each_other() -> None:
    # a box in the top-right corner: the label cannot go above it nor run off the right edge
    x, y = _label_spot((50, 15), (90, 0, 96, 5), (96, 96), [])
    assert x >= 0 and y >= 0 and x + 50 <= 96 and y + 15 <= 96
    first = _label_spot((40, 15), (20, 30, 60, 70), (96, 96), [])
    second = _label_spot((40, 15), (20, 30, 60, 70), (96, 96), [(*first, 40, 15)])
    assert first != second  # the same box twice: the second label moves to a free spot


def test_label_background_is_filled_in_the_class_colour() -> None:
    image = torch.full((3, 96, 96), 0.5)
    picture = draw_boxes(image, [[10, 30, 60, 80]], [3], [0.9], ["bg", "a", "b", "car"])
    array = np.asarray(picture)
    # the label sits above the box (y < 30) on a filled patch of the box colour
    patch = array[:30, 10:40].reshape(-1, 3)
    assert (patch == np.array(class_color(3))).all(axis=1).sum() > 100


def test_draw_detections_keeps_size_and_drops_low_scores() -> None:
    image = torch.rand(3, 64, 80)
    dets = {
        "boxes": torch.tensor([[5.0, 5, 40, 40]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.1]),
    }
    out = draw_detections(image, dets, ["bg", "x"], score_thresh=0.3)
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 80)
    assert torch.equal(out, (image * 255).round().to(torch.uint8))  # nothing drawn


def test_detection_sheet_puts_ground_truth_beside_prediction() -> None:
    image = torch.rand(3, 96, 96)
    target = {
        "boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 95, 95]]),
        "labels": torch.tensor([1, 2]),
    }
    dets = {"boxes": torch.tensor([[12.0, 11, 52, 49], [0, 0, 96, 96]]),
            "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.5])}  # fmt: skip
    sheet = detection_sheet(
        [(image, target, dets)] * 3, ["bg", "circle", "square"], 0.3, min_side=200
    )
    # two pairs per row, each picture enlarged to 200 px: 4 columns wide, 2 rows high + titles
    assert sheet.width >= 4 * 200 and sheet.height > 2 * 200
    assert sheet.width > 2 * image.shape[-1]
    large = torch.rand(3, 1000, 2000)  # large images are shrunk: long side 640
    assert detection_sheet([(large, target, dets)], ["bg", "circle", "square"]).width < 2 * 660


def test_legend_survives_long_class_names() -> None:
    names = ["a" * 300, "traffic light", "x"]
    strip = legend([(n, class_color(i)) for i, n in enumerate(names)], width=300, title="classes:")
    assert strip.width == 300 and 0 < strip.height < 200


def test_segmentation_sheet_has_four_columns_and_draws_ground_truth_like_prediction() -> None:
    image = np.full((32, 64, 3), 128, np.uint8)
    mask = np.zeros((32, 64), np.int64)
    mask[:, 32:] = 2
    gt = mask.copy()
    gt[:4] = 255  # ignored rows
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    sheet = segmentation_sheet([(image, gt, mask)], ["road", "grass", "sky"], palette, min_side=64)
    assert sheet.width >= 4 * 128
    big = np.zeros((1024, 2048), np.int64)  # a Cityscapes frame is shrunk to 512 px wide
    assert (
        segmentation_sheet(
            [(np.zeros((1024, 2048, 3), np.uint8), big, big)], ["road"], palette
        ).width
        < 4 * 530
    )
    array = np.asarray(sheet)
    # ground truth (column 2) and prediction (column 3) use the same, unblended colours
    assert (array == [0, 0, 255]).all(axis=2).sum() >= 2 * 64 * 56


# ----------------------------------------------------------------- charts


def _tiny_coco() -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 7, "name": "unseen"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 5, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
        ],
    }  # fmt: skip
    coco.createIndex()
    return coco


def test_per_class_ap_from_cocoeval_arrays(tmp_path) -> None:
    results = [  # cats perfect, dog missed (a box elsewhere)
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [50, 50, 40, 40], "score": 0.8},
        {"image_id": 2, "category_id": 5, "bbox": [70, 5, 20, 20], "score": 0.7},
    ]
    stats, _, curves = _coco_eval(_tiny_coco(), results)
    assert curves.precision.shape == (10, 101, 3, 4, 3)
    rows = {r["name"]: r for r in per_class_ap(curves)}
    assert rows["cat"]["ap"] == pytest.approx(1.0) and rows["cat"]["num_gt"] == 2
    assert rows["dog"]["ap"] == 0.0 and rows["dog"]["ap50"] == 0.0
    assert math.isnan(rows["unseen"]["ap"])  # no ground truth: -1 in COCOeval, NaN here
    # COCOeval's mAP is the mean of the per-class APs over classes with ground truth
    assert np.nanmean([r["ap"] for r in rows.values()]) == pytest.approx(stats["map"])
    assert "n/a" in format_ap_table(list(rows.values()))
    path = charts.plot_pr_curves(curves, tmp_path / "PR_curve.png")
    assert Image.open(path).size[0] >= 600
    assert charts.plot_per_class_ap(list(rows.values()), tmp_path / "ap.png").is_file()


def test_coco_metric_keeps_the_curves() -> None:
    metric = CocoMetric(_tiny_coco())
    box = torch.tensor([[10.0, 10, 40, 40]])
    metric.update([{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}], [1])
    metric.compute()
    assert metric.curves is not None and metric.curves.cat_names == ["cat", "dog", "unseen"]


def test_confusion_matrix_rows_sum_to_one(tmp_path) -> None:
    confmat = np.array([[50, 10, 0, 0], [5, 30, 0, 5], [0, 0, 0, 0], [0, 0, 0, 20]])
    path = tmp_path / "confusion_matrix_normalized.png"
    normalized = charts.plot_confusion_matrix(confmat, ["road", "car", "absent", "sky"], path)
    assert normalized.shape == (3, 3)  # the class neither in ground truth nor predicted is left out
    np.testing.assert_allclose(normalized.sum(axis=1), 1.0)
    assert path.stat().st_size > 10_000
    full = charts.normalize_confmat(confmat)
    assert full[2].sum() == 0 and full[0, 0] == pytest.approx(50 / 60)


def test_results_png_from_metrics_csv(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["epoch", "step", "train/loss", "val/map", "val/map_large", "lr-SGD"])
        for step in range(0, 300, 10):
            writer.writerow([step // 100, step, 5 - step / 100, "", "", 0.1])
            if step % 100 == 90:
                writer.writerow([step // 100, step, "", step / 300, -1, ""])
    columns = charts.read_metrics_csv(path)
    assert len(columns["train/loss"][0]) == 30 and len(columns["val/map"][0]) == 3
    out = charts.plot_results(path, tmp_path / "results.png")
    width, height = Image.open(out).size
    assert width > height > 200  # one row of 3 panels (val/map_large is undefined: left out)


# --------------------------------------------------------------- callback


def test_plot_writer_after_a_tiny_detection_validation(tmp_path, capsys) -> None:
    root = generate_shapes_coco(tmp_path / "coco", num_train=1, num_val=3, image_size=64, seed=0)
    data = CocoDataModule(root, size=64, batch_size=3, num_workers=0, augment=False)
    task = DetectionTask("small", num_classes=5, size=64, width_mult=0.5, print_table=False)
    writer = PlotWriter(dirpath=tmp_path / "plots", num_images=2)
    _trainer(tmp_path, [writer]).validate(task, data, verbose=False)
    for name in ("PR_curve.png", "per_class_AP.png", "per_class_AP.csv", "val_predictions.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0, name
    assert set(writer.written) >= {"PR_curve.png", "val_predictions.png"}
    sheet = Image.open(tmp_path / "plots" / "val_predictions.png")
    assert sheet.width >= 4 * 320  # two ground truth | prediction pairs, enlarged to 320 px
    text = capsys.readouterr().out
    assert "AP per class" in text and "[plots]" in text
    _trainer(tmp_path, [writer]).test(task, data, verbose=False)
    assert (tmp_path / "plots" / "test_PR_curve.png").is_file()
    assert (tmp_path / "plots" / "test_predictions.png").is_file()


def test_plot_writer_after_segmentation_fit(tmp_path) -> None:
    root = generate_street_scenes(
        tmp_path, cities=("aachen",), per_city=2, size=(32, 64), splits=("val",)
    )
    dataset = CityscapesSegmentation(root, "val")
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_segmentation)
    task = SegmentationTask(arch="small", width_mult=0.5, print_table=False)
    writer = PlotWriter(num_images=2)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    trainer = _trainer(tmp_path, [writer], max_steps=2, log_every_n_steps=1)
    trainer.logger = logger
    trainer.fit(task, loader, loader)
    plots = Path(logger.log_dir) / "plots"
    for name in (
        "IoU_per_class.png",
        "confusion_matrix_normalized.png",
        "val_predictions.png",
        "results.png",
    ):
        assert (plots / name).stat().st_size > 0, name
