"""CocoDetection: item format, both label maps, and every data edge case of the issue (crowd,
empty images, degenerate / out-of-image boxes, unknown category, missing / unreadable image,
grayscale / RGBA / EXIF-rotated files)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mnv3det.data.coco import (
    CocoDataError,
    CocoDetection,
    DetectionImageFolder,
    ImageSizeMismatchError,
    MissingImageError,
    UnknownCategoryError,
    collate_detection,
)
from mnv3det.data.detection_transforms import train_transforms
from mnv3det.data.image_io import ImageReadError

CATEGORIES = [
    {"id": 1, "name": "circle"},
    {"id": 3, "name": "square"},
    {"id": 7, "name": "triangle"},
    {"id": 12, "name": "cross"},
]


def _ann(ann_id, image_id, bbox, category_id=1, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": float(bbox[2] * bbox[3])
        if len(bbox) == 4 and all(map(math.isfinite, bbox))
        else 0.0,
        "iscrowd": iscrowd,
        "segmentation": [],
    }


def write_coco(root: Path, images, annotations, split="val2017", categories=CATEGORIES):
    """Write ``images`` = list of (id, file_name, PIL image or bytes or None, (H, W)) and the
    annotation file in the official layout; ``None`` leaves the file missing."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, file_name, content, (height, width) in images:
        path = root / split / file_name
        if isinstance(content, Image.Image):
            content.save(path, **({"quality": 95} if file_name.endswith(".jpg") else {}))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        entries.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    doc = {"images": entries, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def _rgb(height=40, width=60, colour=(10, 200, 30)):
    return Image.new("RGB", (width, height), colour)


@pytest.fixture
def basic(tmp_path):
    images = [
        (1, "a.png", _rgb(), (40, 60)),
        (2, "b.png", _rgb(colour=(250, 0, 0)), (40, 60)),
        (5, "c.png", _rgb(), (40, 60)),  # only a crowd box: no trainable box
        (9, "d.png", _rgb(), (40, 60)),  # no annotation at all
    ]
    anns = [
        _ann(1, 1, [5, 6, 10, 12], category_id=3),
        _ann(2, 1, [20, 10, 30, 20], category_id=12),
        _ann(3, 2, [0, 0, 60, 40], category_id=7),
        _ann(4, 2, [1, 1, 20, 20], category_id=1, iscrowd=1),
        _ann(5, 5, [2, 2, 30, 30], category_id=1, iscrowd=1),
    ]
    return write_coco(tmp_path, images, anns)


def test_item_format_and_contiguous_labels(basic):
    ds = CocoDetection(basic, "val2017")
    assert len(ds) == 4 and ds.ids == [1, 2, 5, 9]
    assert ds.num_classes == 5
    assert ds.label_to_cat_id == {1: 1, 2: 3, 3: 7, 4: 12}
    assert ds.cat_id_to_label == {1: 1, 3: 2, 7: 3, 12: 4}
    assert ds.class_names == ["__background__", "circle", "square", "triangle", "cross"]
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 60)
    assert image.min() >= 0.0 and image.max() <= 1.0
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0)
    assert target["boxes"].dtype == torch.float32
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 6, 15, 18], [20, 10, 50, 30]]))
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [2, 4]
    assert target["image_id"] == 1 and target["orig_size"] == (40, 60)


def test_torchvision91_label_map(basic):
    ds = CocoDetection(basic, "val2017", label_map="torchvision91")
    assert ds.num_classes == 91
    assert ds.label_to_cat_id == {1: 1, 3: 3, 7: 7, 12: 12}
    assert ds[0][1]["labels"].tolist() == [3, 12]
    assert ds.class_names[3] == "square" and ds.class_names[2] == "N/A"
    assert len(ds.class_names) == 91


def test_torchvision91_rejects_ids_above_90(tmp_path):
    root = write_coco(
        tmp_path, [(1, "a.png", _rgb(), (40, 60))], [], categories=[{"id": 95, "name": "x"}]
    )
    with pytest.raises(CocoDataError, match="95"):
        CocoDetection(root, label_map="torchvision91")
    assert CocoDetection(root).num_classes == 2  # fine with the contiguous map


def test_crowd_boxes_not_trained_on_but_kept_for_evaluation(basic):
    ds = CocoDetection(basic, "val2017")
    _, target = ds[1]
    assert target["labels"].tolist() == [3]  # the crowd box of image 2 is not in the target
    assert ds.stats["crowd_boxes_excluded"] == 2
    assert "2 crowd boxes not trained on" in ds.stats.report()
    # ...but they are still there for COCOeval, in .coco and in the file.
    crowd = [a for a in ds.coco.anns.values() if a["iscrowd"]]
    assert {a["id"] for a in crowd} == {4, 5}
    on_disk = json.loads((basic / "annotations" / "instances_val2017.json").read_text())
    assert sum(a["iscrowd"] for a in on_disk["annotations"]) == 2


def test_empty_images_keep_and_skip(basic):
    keep = CocoDetection(basic, "val2017", empty_images="keep")
    assert keep.ids == [1, 2, 5, 9]
    _, target = keep[3]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert keep.stats["empty_images_kept"] == 2  # image 5 has only a crowd box
    skip = CocoDetection(basic, "val2017", empty_images="skip")
    assert skip.ids == [1, 2]
    assert skip.stats["empty_images_skipped"] == 2
    assert "2 images without boxes skipped" in skip.stats.report()


def test_degenerate_and_out_of_image_boxes_are_clipped_or_dropped_and_counted(tmp_path):
    anns = [
        _ann(1, 1, [10, 10, 20, 15]),  # fine
        _ann(2, 1, [-5, 30, 20, 20]),  # sticks out left and bottom: clipped
        _ann(3, 1, [5, 5, 0, 10]),  # zero width
        _ann(4, 1, [5, 5, 10, -3]),  # negative height
        _ann(5, 1, [70, 5, 10, 10]),  # wholly right of the 60-wide image
        _ann(6, 1, [59.5, 5, 10, 10]),  # clipped to 0.5 px wide: degenerate
        _ann(7, 1, [float("nan"), 5, 10, 10]),  # non-finite
        _ann(8, 1, [1, 2]),  # malformed
    ]
    root = write_coco(tmp_path, [(1, "a.png", _rgb(), (40, 60))], anns)
    ds = CocoDetection(root)
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10, 30, 25], [0, 30, 15, 40]]))
    stats = ds.stats.as_dict()
    assert stats["boxes_clipped"] == 1
    assert stats["degenerate_boxes_dropped"] == 5
    assert stats["outside_boxes_dropped"] == 1
    assert stats["boxes_used"] == 2
    report = ds.stats.report()
    assert "1 boxes clipped to the image" in report
    assert "3 annotations in 1 file: box with no area" in report  # zero w, negative h, 0.5 px
    assert "2 annotations in 1 file: box not 4 finite numbers" in report  # NaN, malformed
    assert "1 annotation in 1 file: box wholly outside the image" in report
    reasons = sorted(p.reason for p in ds.stats.problems)
    assert reasons == 2 * ["bad_box"] + 3 * ["degenerate_box"] + ["outside_box"]


def test_unknown_category_is_an_error_naming_it_or_skipped(tmp_path):
    anns = [_ann(1, 1, [1, 1, 10, 10], category_id=3), _ann(77, 1, [5, 5, 10, 10], category_id=42)]
    root = write_coco(tmp_path, [(1, "a.png", _rgb(), (40, 60))], anns)
    with pytest.raises(UnknownCategoryError) as info:
        CocoDetection(root)
    message = str(info.value)
    assert "42" in message and "annotation id 77" in message and "instances_val2017.json" in message
    ds = CocoDetection(root, on_error="skip")
    assert ds[0][1]["labels"].tolist() == [2]
    assert ds.stats["unknown_category_annotations_skipped"] == 1


def test_missing_image_file_is_an_error_naming_it_or_skipped(tmp_path):
    images = [(1, "a.png", _rgb(), (40, 60)), (2, "gone.jpg", None, (40, 60))]
    root = write_coco(tmp_path, images, [_ann(1, 2, [1, 1, 5, 5])])
    with pytest.raises(MissingImageError, match=r"gone\.jpg") as info:
        CocoDetection(root)
    assert isinstance(info.value, FileNotFoundError)
    ds = CocoDetection(root, on_error="skip")
    assert ds.ids == [1]
    assert ds.stats["files_missing_file"] == 1
    assert "left out 1 file: image file missing" in ds.stats.report()


@pytest.fixture
def with_unreadable(tmp_path):
    images = [
        (1, "a.png", _rgb(colour=(1, 2, 3)), (40, 60)),
        (2, "broken.jpg", b"this is not a JPEG", (40, 60)),
        (3, "c.png", _rgb(colour=(9, 8, 7)), (40, 60)),
    ]
    return write_coco(tmp_path, images, [_ann(1, 3, [1, 1, 5, 5], category_id=7)])


def test_unreadable_image_is_an_error_naming_it(with_unreadable):
    with pytest.raises(ImageReadError, match=r"broken\.jpg.*image id 2"):
        CocoDetection(with_unreadable)  # found by the header scan, before any training


def test_unreadable_image_skip_leaves_it_out_of_the_index(with_unreadable):
    ds = CocoDetection(with_unreadable, on_error="skip")
    assert ds.ids == [1, 3]  # no substitute, no duplicate
    image, target = ds[1]
    assert target["image_id"] == 3 and target["labels"].tolist() == [3]
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([9, 8, 7]) / 255.0)
    assert ds.stats["files_unreadable_file"] == 1
    assert "left out 1 file: image file unreadable" in ds.stats.report()


def test_file_unreadable_after_the_scan_is_left_out_of_its_batch_and_listed_once(
    with_unreadable,
):
    ds = CocoDetection(with_unreadable, on_error="skip")
    (with_unreadable / "val2017" / "c.png").write_bytes(b"broken later")
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_detection)
    for _ in range(2):  # two epochs: one file, counted once, from a worker
        ids = [t["image_id"] for _, targets in loader for t in targets]
        assert ids == [1]
    rows = ds.stats.problems
    assert [(r.file, r.reason) for r in rows[-1:]] == [("c.png", "unreadable_when_read")]
    assert ds.stats["files_unreadable_when_read"] == 1
    strict = CocoDetection(with_unreadable, on_error="skip")
    strict.on_error = "raise"
    (with_unreadable / "val2017" / "a.png").write_bytes(b"broken too")
    with pytest.raises(ImageReadError, match=r"a\.png"):
        strict[0]


def test_grayscale_rgba_and_exif_rotated_images_come_out_as_correct_rgb(tmp_path):
    gray = Image.new("L", (60, 40), 77)
    rgba = Image.new("RGBA", (60, 40), (200, 100, 50, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 10, 10))  # fully transparent corner -> black
    # Stored 60 wide x 40 high, red square at the stored top-left, EXIF orientation 6 (the
    # viewer rotates 90° clockwise): upright it is 40 wide x 60 high, red square at the top-right.
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_path = tmp_path / "val2017" / "rot.jpg"
    exif_path.parent.mkdir(parents=True)
    stored.save(exif_path, quality=98, exif=exif)
    images = [
        (1, "gray.png", gray, (40, 60)),
        (2, "rgba.png", rgba, (40, 60)),
        (3, "rot.jpg", exif_path.read_bytes(), (60, 40)),  # the json gives the upright size
    ]
    root = write_coco(tmp_path, images, [_ann(1, 3, [24, 0, 16, 16], category_id=1)])
    ds = CocoDetection(root)

    image, _ = ds[0]
    assert image.shape == (3, 40, 60)
    torch.testing.assert_close(image[:, 5, 5], torch.full((3,), 77 / 255.0))

    image, _ = ds[1]
    assert image.shape == (3, 40, 60)
    torch.testing.assert_close(image[:, 20, 30], torch.tensor([200, 100, 50]) / 255.0)
    torch.testing.assert_close(image[:, 2, 2], torch.zeros(3))

    image, target = ds[2]
    assert image.shape == (3, 60, 40) and target["orig_size"] == (60, 40)
    pixels = (image * 255).round()
    red_top_right = pixels[:, 2:14, 26:38].mean(dim=(1, 2))
    blue_top_left = pixels[:, 2:14, 2:14].mean(dim=(1, 2))
    assert red_top_right[0] > 200 and red_top_right[2] < 50
    assert blue_top_left[2] > 200 and blue_top_left[0] < 50
    assert ds.stats["image_size_mismatch"] == 0


def test_file_size_different_from_annotation_file_is_an_error_or_skipped(tmp_path):
    images = [
        (1, "a.png", _rgb(height=20, width=30), (40, 60)),  # json claims 40x60
        (2, "b.png", _rgb(), (40, 60)),
    ]
    anns = [_ann(1, 1, [2, 2, 10, 10]), _ann(2, 2, [20, 5, 30, 10])]
    root = write_coco(tmp_path, images, anns)
    with pytest.raises(ImageSizeMismatchError, match=r"a\.png.*60x40.*30x20"):
        CocoDetection(root)
    ds = CocoDetection(root, on_error="skip")
    assert ds.ids == [2]
    assert ds.stats["files_size_mismatch"] == 1


def test_transforms_receive_pascal_voc_boxes_with_labels(basic):
    ds = CocoDetection(basic, transforms=train_transforms(64, seed=0))
    for index in range(len(ds)):
        image, target = ds[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"])
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert set(target["labels"].tolist()) <= {1, 2, 3, 4}


def test_collate_detection(basic):
    ds = CocoDetection(basic)
    images, targets = collate_detection([ds[0], ds[3]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for t in targets] == [1, 9]
    assert images[0].shape == (3, 40, 60)


def test_layout_and_argument_errors(tmp_path, basic):
    with pytest.raises(FileNotFoundError, match=r"instances_train2017\.json"):
        CocoDetection(basic, "train2017")
    with pytest.raises(ValueError, match="label_map"):
        CocoDetection(basic, label_map="coco80")
    with pytest.raises(ValueError, match="on_error"):
        CocoDetection(basic, on_error="ignore")
    with pytest.raises(ValueError, match="empty_images"):
        CocoDetection(basic, empty_images="drop")
    bad = tmp_path / "bad"
    (bad / "val2017").mkdir(parents=True)
    (bad / "annotations").mkdir()
    (bad / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(CocoDataError, match=r"instances_val2017\.json"):
        CocoDetection(bad)


def test_explicit_ann_file_and_image_dir(basic, tmp_path):
    ds = CocoDetection(
        tmp_path / "elsewhere",
        ann_file=basic / "annotations" / "instances_val2017.json",
        image_dir=basic / "val2017",
    )
    assert len(ds) == 4


def test_image_folder_for_predict(tmp_path):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    _rgb().save(folder / "b.png")
    Image.new("L", (20, 10), 5).save(folder / "sub" / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    ds = DetectionImageFolder(folder)
    assert ds.files == ["b.png", "sub/a.jpg"]
    image, meta = ds[1]
    assert image.shape == (3, 10, 20)
    assert meta == {"image_id": 1, "file_name": "sub/a.jpg", "orig_size": (10, 20)}
    with_ids = DetectionImageFolder(folder, files=["b.png"], image_ids={"b.png": 42})
    assert with_ids[0][1]["image_id"] == 42
    (folder / "zz.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match=r"zz\.png"):
        DetectionImageFolder(folder)
    skipping = DetectionImageFolder(folder, on_error="skip")
    assert skipping.files == ["b.png", "sub/a.jpg"]
    assert [(p.file, p.reason) for p in skipping.stats.problems] == [("zz.png", "unreadable_file")]
    with pytest.raises(FileNotFoundError):
        DetectionImageFolder(tmp_path / "empty_missing")


def test_on_shapes_data_every_box_is_used(tmp_path):
    from mnv3det.data.synthetic_coco import generate_shapes_coco

    root = generate_shapes_coco(tmp_path, num_train=1, num_val=10, image_size=64, seed=0)
    ds = CocoDetection(root, "val2017")
    raw = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    plain = [a for a in raw["annotations"] if not a["iscrowd"]]
    assert sum(len(ds[i][1]["boxes"]) for i in range(len(ds))) == len(plain)
    assert ds.stats["boxes_clipped"] == 0 and ds.stats["degenerate_boxes_dropped"] == 0
    assert np.isclose(ds.stats["boxes_used"], len(plain))
