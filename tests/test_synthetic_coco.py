"""The generated shapes data set is valid COCO: pycocotools loads it, COCOeval scores its own
ground truth as perfect, boxes lie inside images, and it has the features the demo relies on."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mnv3det.data.synthetic_coco import SHAPE_CATEGORIES, generate_shapes_coco


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return generate_shapes_coco(
        root, num_train=40, num_val=12, image_size=(96, 128), seed=3, empty_fraction=0.15,
        crowd_fraction=0.3,
    )  # fmt: skip


def test_official_layout_and_pycocotools_loads(shapes_root):
    for split, count in (("train2017", 40), ("val2017", 12)):
        ann_file = shapes_root / "annotations" / f"instances_{split}.json"
        coco = _quiet(COCO, str(ann_file))
        assert len(coco.imgs) == count
        for info in coco.imgs.values():
            path = shapes_root / split / info["file_name"]
            with Image.open(path) as image:
                assert image.size == (info["width"], info["height"]) == (128, 96)
                assert image.mode == "RGB"


def test_boxes_inside_images_and_consistent(shapes_root):
    coco = _quiet(COCO, str(shapes_root / "annotations" / "instances_train2017.json"))
    assert coco.anns
    for ann in coco.anns.values():
        x, y, w, h = ann["bbox"]
        info = coco.imgs[ann["image_id"]]
        assert w > 0 and h > 0
        assert (
            x >= 0 and y >= 0 and x + w <= info["width"] + 1e-6 and y + h <= info["height"] + 1e-6
        )
        assert 0 < ann["area"] <= (w + 0.01) * (h + 0.01)  # bbox is rounded to 0.01
        if ann["iscrowd"]:
            rle = mask_utils.frPyObjects(ann["segmentation"], info["height"], info["width"])
            assert mask_utils.area(rle) == pytest.approx(ann["area"])
            np.testing.assert_allclose(mask_utils.toBbox(rle), ann["bbox"])
        else:
            poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            np.testing.assert_allclose(poly.min(0), [x, y], atol=0.02)
            np.testing.assert_allclose(poly.max(0), [x + w, y + h], atol=0.02)


def test_classes_empty_images_crowds_and_noncontiguous_ids(shapes_root):
    data = json.loads((shapes_root / "annotations" / "instances_train2017.json").read_text())
    ids = [c["id"] for c in data["categories"]]
    assert ids == [cat_id for cat_id, _ in SHAPE_CATEGORIES]
    assert ids != list(range(1, len(ids) + 1))  # exercises the contiguous label mapping
    per_class = Counter(a["category_id"] for a in data["annotations"] if not a["iscrowd"])
    assert len(per_class) == len(SHAPE_CATEGORIES)
    annotated = {a["image_id"] for a in data["annotations"]}
    assert any(img["id"] not in annotated for img in data["images"])  # negatives present
    assert any(a["iscrowd"] for a in data["annotations"])
    sizes = [max(a["bbox"][2:]) / 96 for a in data["annotations"] if not a["iscrowd"]]
    assert min(sizes) < 0.25 and max(sizes) > 0.35  # a real size range
    multi = Counter(a["image_id"] for a in data["annotations"] if not a["iscrowd"])
    assert max(multi.values()) >= 2  # several objects per image happen


def test_image_ids_unique_across_splits(shapes_root):
    ids = []
    for split in ("train2017", "val2017"):
        data = json.loads((shapes_root / "annotations" / f"instances_{split}.json").read_text())
        ids += [img["id"] for img in data["images"]]
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    assert len(ids) == len(set(ids))


def test_cocoeval_scores_ground_truth_as_perfect(shapes_root):
    coco = _quiet(COCO, str(shapes_root / "annotations" / "instances_val2017.json"))
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in coco.anns.values()
        if not a["iscrowd"]
    ]
    result = _quiet(coco.loadRes, dets)
    evaluator = COCOeval(coco, result, "bbox")
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
    assert evaluator.stats[1] == pytest.approx(1.0)  # AP50


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_in_seed_and_reused(tmp_path):
    a = generate_shapes_coco(tmp_path / "a", num_train=6, num_val=3, image_size=64, seed=1)
    b = generate_shapes_coco(tmp_path / "b", num_train=6, num_val=3, image_size=64, seed=1)
    c = generate_shapes_coco(tmp_path / "c", num_train=6, num_val=3, image_size=64, seed=2)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # Same arguments again: reused, nothing rewritten.
    ann = a / "annotations" / "instances_train2017.json"
    before = ann.stat().st_mtime_ns
    generate_shapes_coco(a, num_train=6, num_val=3, image_size=64, seed=1)
    assert ann.stat().st_mtime_ns == before
    # More training images do not change the earlier ones or the validation split.
    d = generate_shapes_coco(tmp_path / "d", num_train=8, num_val=3, image_size=64, seed=1)
    assert (d / "train2017" / "000000000003.jpg").read_bytes() == (
        a / "train2017" / "000000000003.jpg"
    ).read_bytes()
    assert _digest(d / "val2017") == _digest(a / "val2017")


def test_png_output(tmp_path):
    root = generate_shapes_coco(tmp_path, num_train=2, num_val=1, image_size=48, image_format="png")
    assert len(list((root / "train2017").glob("*.png"))) == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 16},
        {"image_size": (64, 64, 3)},
        {"num_train": -1},
        {"min_size": 0.5, "max_size": 0.2},
        {"max_objects": 0},
        {"image_format": "gif"},
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_shapes_coco(tmp_path, **{"num_train": 1, "num_val": 1, **kwargs})
