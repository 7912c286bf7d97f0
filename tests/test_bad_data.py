"""Bad data never stops a run, never skews it, and is never silently lost.

Messy COCO-style and Cityscapes-style folders (built here in tmp dirs from the generated data
sets) go through the data sets, the data modules and real ``mnv3det fit/validate/predict``
subprocesses, with ``on_error: raise`` (every problem is an error at setup naming the file or
annotation id and the fix) and ``on_error: skip`` (bad items removed before sampling, listed per
file in ``skipped.csv``, one summary at the end of the run).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mnv3det.data.cityscapes import (
    CityscapesDataError,
    CityscapesLabelNotFoundError,
    CityscapesSegmentation,
    collate_segmentation,
)
from mnv3det.data.coco import (
    CocoDataError,
    CocoDetection,
    EmptySplitError,
    ImageSizeMismatchError,
    MissingImageError,
    UnknownCategoryError,
    UnknownImageIdError,
)
from mnv3det.data.image_io import ImageReadError
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.tasks.detection_data import CocoDataModule

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- COCO helpers
def shapes(root: Path, num_train: int = 6, num_val: int = 3) -> Path:
    return generate_shapes_coco(root, num_train=num_train, num_val=num_val, image_size=64, seed=1)


def ann_path(root: Path, split: str = "train2017") -> Path:
    return root / "annotations" / f"instances_{split}.json"


def edit_json(root: Path, change: Callable[[dict], None], split: str = "train2017") -> None:
    doc = json.loads(ann_path(root, split).read_text())
    change(doc)
    ann_path(root, split).write_text(json.dumps(doc))


def image_file(root: Path, index: int, split: str = "train2017") -> Path:
    doc = json.loads(ann_path(root, split).read_text())
    return root / split / doc["images"][index]["file_name"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def add_ann(doc: dict, image_index: int, bbox: list, category_id: int | None = None) -> None:
    doc["annotations"].append(
        {
            "id": 10_000 + len(doc["annotations"]),
            "image_id": doc["images"][image_index]["id"],
            "category_id": doc["categories"][0]["id"] if category_id is None else category_id,
            "bbox": bbox,
            "area": 1.0,
            "iscrowd": 0,
        }
    )


def resize_after_annotation(root: Path, index: int = 2) -> None:
    path = image_file(root, index)
    Image.open(path).resize((32, 32)).save(path, format="JPEG")


def png_named_jpg(root: Path, index: int = 3) -> None:
    path = image_file(root, index)
    Image.open(path).convert("RGB").save(path, format="PNG")  # content PNG, name .jpg


def duplicate_image_id(root: Path) -> None:
    """A second entry with the id of image 4 (another file): whose boxes are whose?"""
    copy = image_file(root, 4).with_name("copy.jpg")
    copy.write_bytes(image_file(root, 4).read_bytes())
    edit_json(root, lambda doc: doc["images"].append({**doc["images"][4], "file_name": copy.name}))


# Each case: (name, break the train split of a fresh shapes data set, error class, text in the
# error, (reason in skipped.csv, files listed), images left in skip mode out of 6)
COCO_CASES = [
    (
        "missing file",
        lambda r: image_file(r, 0).unlink(),
        MissingImageError,
        "does not exist",
        ("missing_file", 1),
        5,
    ),
    ("zero-byte file", lambda r: image_file(r, 1).write_bytes(b""), ImageReadError, "empty", ("unreadable_file", 1), 5),
    ("truncated JPEG", lambda r: truncate(image_file(r, 1)), ImageReadError, "truncated", ("unreadable_file", 1), 5),
    ("text named .jpg", lambda r: image_file(r, 1).write_text("hello"), ImageReadError, "cannot identify", ("unreadable_file", 1), 5),
    ("resized after annotation", resize_after_annotation, ImageSizeMismatchError, "64x64 (WxH), the file is 32x32", ("size_mismatch", 1), 5),
    ("duplicate image id", duplicate_image_id, CocoDataError, "listed 2 times", ("duplicate_image_id", 2), 5),
    (
        "unknown category id",
        lambda r: edit_json(r, lambda d: add_ann(d, 0, [1, 1, 9, 9], category_id=999)),
        UnknownCategoryError,
        "category_id 999",
        ("unknown_category", 1),
        6,
    ),
    (
        "annotation of an unknown image id",
        lambda r: edit_json(r, lambda d: d["annotations"].append({"id": 77, "image_id": 4242, "category_id": 1, "bbox": [1, 1, 5, 5]})),
        UnknownImageIdError,
        "annotation id 77",
        ("unknown_image_id", 1),
        6,
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "breaks", "error", "text", "listed", "left"),
    COCO_CASES,
    ids=[c[0] for c in COCO_CASES],
)
def test_coco_case_strict_error_or_skipped(tmp_path, name, breaks, error, text, listed, left):
    root = shapes(tmp_path / "coco")
    breaks(root)
    with pytest.raises(error) as info:
        CocoDetection(root, "train2017")
    message = str(info.value)
    assert text in message and "on_error='skip'" in message
    assert "instances_train2017.json" in message or "train2017" in message
    ds = CocoDetection(root, "train2017", on_error="skip")
    assert len(ds) == left and len(set(ds.ids)) == len(ds.ids)
    reason, files = listed
    assert ds.stats.files_by_reason() == {reason: files}
    for index in range(len(ds)):  # every item left is readable and sane
        image, target = ds[index]
        h, w = image.shape[-2:]
        boxes = target["boxes"]
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
        assert ((target["labels"] >= 1) & (target["labels"] < ds.num_classes)).all()


def test_png_named_jpg_is_read_as_png(tmp_path):
    root = shapes(tmp_path / "coco")
    png_named_jpg(root, 3)
    ds = CocoDetection(root, "train2017")
    assert len(ds) == 6 and ds.stats.problems == []
    assert ds[3][0].shape[-2:] == (64, 64)


def test_bad_boxes_are_dropped_or_clipped_and_listed_in_both_modes(tmp_path):
    root = shapes(tmp_path / "coco")

    def change(doc: dict) -> None:
        add_ann(doc, 0, [float("nan"), 1, 5, 5])
        add_ann(doc, 0, [1, 1, float("inf"), 5])
        add_ann(doc, 1, [5, 5, -4, 8])
        add_ann(doc, 1, [100, 100, 5, 5])  # outside the 64x64 image
        add_ann(doc, 2, [-10, 50, 30, 30])  # sticks out: clipped

    edit_json(root, change)
    for mode in ("raise", "skip"):
        ds = CocoDetection(root, "train2017", on_error=mode)
        assert ds.stats.files_by_reason() == {"bad_box": 1, "degenerate_box": 1, "outside_box": 1}
        assert ds.stats.counts["bad_box_count"] == 2 and ds.stats.counts["boxes_clipped"] == 1
        for index in range(len(ds)):
            boxes = ds[index][1]["boxes"]
            assert torch.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= 64).all()


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("{not json", "is not JSON"),
        ("[]", "holds a list (a results file?)"),
        ('{"annotations": [], "categories": []}', "has no 'images' key"),
        ('{"images": [], "annotations": [], "categories": [{"id": 1}]}', "lists no images"),
        ('{"images": {}, "categories": []}', "'images' is a dict, not a list"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [], '
         '"annotations": [{"bbox": [1, 2, 3, 4]}]}', "annotations[0]"),
    ],
)  # fmt: skip
def test_broken_annotation_file_is_an_error_naming_it(tmp_path, content, text):
    root = shapes(tmp_path / "coco")
    ann_path(root).write_text(content)
    for mode in ("raise", "skip"):
        with pytest.raises(CocoDataError, match=r"instances_train2017\.json") as info:
            CocoDetection(root, "train2017", on_error=mode)
        assert text in str(info.value)
    with pytest.raises(CocoDataError, match=r"instances_train2017\.json"):  # the data module too
        dm = CocoDataModule(root, size=64, num_workers=0, val_split="train2017")
        _ = dm.num_classes


def test_split_with_nothing_usable_left_is_an_error(tmp_path):
    root = shapes(tmp_path / "coco")
    for index in range(6):
        image_file(root, index).write_bytes(b"")
    with pytest.raises(EmptySplitError, match="no usable image") as info:
        CocoDetection(root, "train2017", on_error="skip")
    assert "6 unreadable_file" in str(info.value)


def test_strict_error_counts_the_other_problems(tmp_path):
    root = shapes(tmp_path / "coco")
    image_file(root, 0).unlink()
    image_file(root, 1).write_bytes(b"")
    resize_after_annotation(root, 2)
    with pytest.raises(MissingImageError) as info:
        CocoDetection(root, "train2017")
    assert "3 problems" in str(info.value)
    assert "1 missing_file" in str(info.value) and "1 size_mismatch" in str(info.value)


def test_skip_mode_has_no_substitutes_or_duplicates_with_workers(tmp_path):
    root = shapes(tmp_path / "coco")
    image_file(root, 0).unlink()
    truncate(image_file(root, 1))
    dm = CocoDataModule(root, size=64, batch_size=2, num_workers=2, on_error="skip", seed=0)
    dm.setup("fit")
    ids = []
    for epoch in range(2):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        epoch_ids = [t["image_id"] for _, targets in loader for t in targets]
        assert sorted(epoch_ids) == sorted(dm.train_dataset.ids)  # each once, none substituted
        ids.append(epoch_ids)
    assert len(dm.train_dataset) == 4


# ----------------------------------------------------------------------------- Cityscapes
def scenes(root: Path) -> Path:
    return generate_street_scenes(root, cities=("aachen",), per_city=4, size=(32, 64))


def label_of(root: Path, index: int, split: str = "train") -> Path:
    return sorted((root / "gtFine" / split).rglob("*_gtFine_labelIds.png"))[index]


def image_of(root: Path, index: int, split: str = "train") -> Path:
    return sorted((root / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))[index]


def wrong_ids(root: Path) -> None:
    label = np.asarray(Image.open(label_of(root, 2))).copy()
    label[0, 0] = 200
    Image.fromarray(label).save(label_of(root, 2))


CITYSCAPES_CASES = [
    ("missing label", lambda r: label_of(r, 0).unlink(), CityscapesLabelNotFoundError, "missing_label"),
    ("broken label", lambda r: label_of(r, 1).write_bytes(b"garbage"), ImageReadError, "unreadable_label"),
    ("label of the wrong size", lambda r: Image.new("L", (16, 8)).save(label_of(r, 1)), CityscapesDataError, "label_size_mismatch"),
    ("label ids outside the set", wrong_ids, CityscapesDataError, "unknown_label_ids"),
    ("truncated image", lambda r: truncate(image_of(r, 3)), ImageReadError, "unreadable_file"),
    ("zero-byte image", lambda r: image_of(r, 3).write_bytes(b""), ImageReadError, "unreadable_file"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "breaks", "error", "reason"), CITYSCAPES_CASES, ids=[c[0] for c in CITYSCAPES_CASES]
)
def test_cityscapes_case_found_at_setup_or_skipped(tmp_path, name, breaks, error, reason):
    root = scenes(tmp_path / "cs")
    breaks(root)
    with pytest.raises(error) as info:
        CityscapesSegmentation(root, "train")
    assert "on_error='skip'" in str(info.value) and "aachen_" in str(info.value)
    ds = CityscapesSegmentation(root, "train", on_error="skip")
    assert len(ds) == 3
    assert ds.stats.files_by_reason() == {reason: 1}
    for index in range(len(ds)):
        _, mask = ds[index]
        assert set(mask.unique().tolist()) <= set(range(19)) | {255}


def test_cityscapes_pair_broken_mid_run_is_left_out_once(tmp_path):
    root = scenes(tmp_path / "cs")
    ds = CityscapesSegmentation(root, "train", on_error="skip")
    label_of(root, 1).write_bytes(b"broken after the check")
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_segmentation)
    for _ in range(2):
        assert sum(len(images) for images, _ in loader) == 3
    assert ds.stats.files_by_reason() == {"unreadable_when_read": 1}


# ----------------------------------------------------------------------------- CLI runs
def mnv3det(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnv3det.cli", command, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_skipped(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def messy_coco(root: Path) -> Path:
    """Several kinds of problems in train2017 and val2017 of one shapes data set."""
    root = shapes(root, num_train=10, num_val=4)
    image_file(root, 0).unlink()  # missing
    truncate(image_file(root, 1))  # truncated JPEG
    image_file(root, 2).write_bytes(b"")  # zero bytes
    resize_after_annotation(root, 3)  # resized after it was annotated
    png_named_jpg(root, 4)  # fine: read as the PNG it is

    def change(doc: dict) -> None:
        add_ann(doc, 5, [float("nan"), 1, 5, 5])
        add_ann(doc, 6, [100, 100, 5, 5])
        add_ann(doc, 7, [2, 2, 5, 5], category_id=999)
        doc["annotations"].append(
            {"id": 99, "image_id": 4242, "category_id": 1, "bbox": [1, 1, 5, 5]}
        )

    edit_json(root, change)
    truncate(image_file(root, 1, "val2017"))
    return root


DET = [
    *["--config", str(REPO / "configs/ssdlite320_mnv3_small_coco.yaml")],
    *["--data.label_map", "contiguous", "--data.size", "64", "--data.batch_size", "4"],
    *["--data.pin_memory", "false", "--model.num_classes", "5", "--model.size", "64"],
    *["--model.width_mult", "0.5", "--trainer.accelerator", "cpu", "--trainer.devices", "1"],
    *["--trainer.benchmark", "false", "--trainer.num_sanity_val_steps", "0"],
]
FIT = ["--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--data.num_workers", "2"]  # fmt: skip


def data_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "[data]" in line]


def test_cli_detection_fit_validate_predict_in_both_modes(tmp_path):
    root = messy_coco(tmp_path / "coco")
    data = ["--data.root", str(root)]

    strict = mnv3det("fit", *DET, *data, *FIT, cwd=tmp_path)
    assert strict.returncode == 2, strict.stderr[-2000:]
    error = [line for line in strict.stderr.splitlines() if line.startswith("mnv3det fit: error")]
    assert len(error) == 1 and "on_error='skip'" in error[0]
    assert "problems in instances_train2017.json" in error[0]

    fit = mnv3det("fit", *DET, *data, *FIT, "--data.on_error", "skip", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    out = fit.stdout + fit.stderr
    lines = data_lines(out)
    assert sum("CocoDetection[train2017]" in line for line in lines) == 1  # once, at the end
    summary = "\n".join(lines)
    assert "6 of 10 images used" in summary and "3 of 4 images used" in summary
    (run,) = {p.parent for p in (tmp_path / "logs").rglob("skipped.csv")}
    assert (run / "checkpoints/last.ckpt").is_file()  # the run's own folder
    rows = read_skipped(run / "skipped.csv")
    got = sorted((r["split"], r["file"], r["reason"]) for r in rows)
    doc = json.loads(ann_path(root).read_text())
    name = [im["file_name"] for im in doc["images"]]
    val_name = json.loads(ann_path(root, "val2017").read_text())["images"][1]["file_name"]
    assert got == sorted([
        ("train2017", name[0], "missing_file"),
        ("train2017", name[1], "unreadable_file"),
        ("train2017", name[2], "unreadable_file"),
        ("train2017", name[3], "size_mismatch"),
        ("train2017", name[5], "bad_box"),
        ("train2017", name[6], "outside_box"),
        ("train2017", name[7], "unknown_category"),
        ("train2017", "instances_train2017.json", "unknown_image_id"),
        ("val2017", val_name, "unreadable_file"),
    ])  # fmt: skip
    assert f"9 problems in 9 files, each with its reason: {run / 'skipped.csv'}" in summary
    print("\n".join(lines))  # the summary, for the record (pytest -s)

    last = run / "checkpoints/last.ckpt"
    validate = mnv3det(
        "validate", *DET, *data, "--data.on_error", "skip", "--data.num_workers", "0",
        "--ckpt_path", str(last), cwd=tmp_path,
    )  # fmt: skip
    assert validate.returncode == 0, validate.stderr[-3000:]
    lines = data_lines(validate.stdout + validate.stderr)
    assert len([line for line in lines if "CocoDetection[val2017]" in line]) == 1
    assert not any("train2017" in line for line in lines)

    predict = mnv3det(
        "predict", *DET, *data, "--data.on_error", "skip", "--data.num_workers", "2",
        "--ckpt_path", str(last), "--data.predict_dir", str(root / "val2017"), cwd=tmp_path,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stderr[-3000:]
    lines = data_lines(predict.stdout + predict.stderr)
    assert any("left out 1 file: image file unreadable" in line for line in lines)
    out_dir = tmp_path / "predictions/ssdlite320_mnv3_small_coco"
    index = json.loads((out_dir / "images.json").read_text())
    ids = [im["id"] for im in index["images"]]
    assert len(ids) == len(set(ids)) == 3  # the unreadable one left out, no substitute
    detections = json.loads((out_dir / "detections.json").read_text())
    per_image = {i: sum(d["image_id"] == i for d in detections) for i in ids}
    assert max(per_image.values()) <= 300


def messy_scenes(root: Path) -> Path:
    root = scenes(root)
    wrong_ids(root)  # pair 2
    truncate(image_of(root, 3))
    label_of(root, 0).unlink()
    return root


SEG = [
    *["--config", str(REPO / "configs/lraspp_mnv3_small_cityscapes.yaml")],
    *["--model.width_mult", "0.5", "--data.num_workers", "2", "--data.pin_memory", "false"],
    *["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.sync_batchnorm", "false"],
    *["--trainer.benchmark", "false", "--data.crop_size", "[32, 64]", "--data.batch_size", "1"],
    *["--data.val_batch_size", "2", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"],
    *["--trainer.num_sanity_val_steps", "0"],
]  # fmt: skip


def test_cli_segmentation_fit_in_both_modes(tmp_path):
    root = messy_scenes(tmp_path / "cs")
    strict = mnv3det("fit", *SEG, "--data.root", str(root), cwd=tmp_path)
    assert strict.returncode == 2, strict.stderr[-2000:]
    error = [line for line in strict.stderr.splitlines() if line.startswith("mnv3det fit: error")]
    assert len(error) == 1 and "3 bad pairs" in error[0]

    fit = mnv3det("fit", *SEG, "--data.root", str(root), "--data.on_error", "skip", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    lines = data_lines(fit.stdout + fit.stderr)
    assert sum("CityscapesSegmentation[train]: 1 of 4 images used" in line for line in lines) == 1
    (csv_file,) = (tmp_path / "logs").rglob("skipped.csv")
    assert (csv_file.parent / "checkpoints/last.ckpt").is_file()  # the run's own folder
    rows = read_skipped(csv_file)
    assert sorted(r["reason"] for r in rows) == [
        "missing_label",
        "unknown_label_ids",
        "unreadable_file",
    ]
    assert all(r["split"] == "train" for r in rows)
