"""mnv3det.metrics.coco: equal to pycocotools run directly, DDP-padding duplicates, label mapping."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from pycocotools.cocoeval import COCOeval

from mnv3det.data.coco import CocoDetection
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.metrics.coco import STAT_NAMES, CocoMetric, detections_to_coco_results


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> CocoDetection:
    root = generate_shapes_coco(
        tmp_path_factory.mktemp("coco") / "shapes", num_train=2, num_val=24, image_size=160, seed=3
    )
    return CocoDetection(root, split="val2017")


def _fake_detections(dataset: CocoDetection, seed: int = 0) -> tuple[list[int], list[dict]]:
    """Jittered ground truth (some with a wrong class) plus random false positives."""
    gen = torch.Generator().manual_seed(seed)
    ids, dets = [], []
    for index in range(len(dataset)):
        image_id = dataset.ids[index]
        anns = dataset.coco.imgToAnns[image_id]
        gt = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        gt[:, 2:] += gt[:, :2]
        labels = torch.tensor(
            [dataset.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64
        )
        boxes = gt + torch.randn(gt.shape, generator=gen) * 3
        flip = torch.rand(len(labels), generator=gen) < 0.2
        labels = torch.where(flip, (labels % (dataset.num_classes - 1)) + 1, labels)
        fp = torch.rand(3, 2, generator=gen) * 100
        boxes = torch.cat([boxes, torch.cat([fp, fp + 30], 1)])
        labels = torch.cat([labels, torch.randint(1, dataset.num_classes, (3,), generator=gen)])
        scores = torch.rand(len(boxes), generator=gen)
        ids.append(image_id)
        dets.append({"boxes": boxes, "scores": scores, "labels": labels})
    return ids, dets


def _pycocotools_directly(dataset: CocoDetection, ids, dets, tmp_path) -> list[float]:
    results = []
    for image_id, det in zip(ids, dets, strict=True):
        for box, score, label in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
        ):
            x0, y0, x1, y1 = box
            results.append({"image_id": image_id, "category_id": dataset.label_to_cat_id[label],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(str(path)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def test_metric_equals_pycocotools(shapes: CocoDetection, tmp_path) -> None:
    ids, dets = _fake_detections(shapes)
    expected = _pycocotools_directly(shapes, ids, dets, tmp_path)
    metric = CocoMetric(shapes.coco, shapes.label_to_cat_id)
    half = len(ids) // 2
    metric.update(dets[:half], [{"image_id": i} for i in ids[:half]])
    metric.update(dets[half:], ids[half:])  # plain ids work too
    stats = metric.compute()
    assert list(stats) == list(STAT_NAMES)
    assert [stats[n] for n in STAT_NAMES] == pytest.approx(expected, abs=1e-12)
    assert 0.2 < stats["map_50"] < 1.0
    assert "Average Precision" in metric.summary


def test_repeated_images_count_once(shapes: CocoDetection) -> None:
    """DistributedSampler pads with repeated images: the repeat must not be evaluated twice."""
    ids, dets = _fake_detections(shapes, seed=1)
    ref = CocoMetric(shapes.coco, shapes.label_to_cat_id)
    ref.update(dets, ids)
    padded = CocoMetric(shapes.coco, shapes.label_to_cat_id)
    padded.update(dets, ids)
    other = [{k: v.flip(0) for k, v in d.items()} for d in dets[:2]]  # repeats, any content
    other[0]["scores"] = other[0]["scores"] * 0 + 0.99
    padded.update(other, ids[:2])
    assert padded.compute() == ref.compute()


def test_partial_and_empty_evaluation(shapes: CocoDetection) -> None:
    metric = CocoMetric(shapes.coco, shapes.label_to_cat_id)
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    metric.update([empty] * 3, shapes.ids[:3])
    stats = metric.compute()
    assert stats["map"] in (0.0, -1.0) and stats["mar_100"] in (0.0, -1.0)
    metric.reset()
    ids, dets = _fake_detections(shapes)
    metric.update(dets[:5], ids[:5])  # only the evaluated images count
    assert metric.compute()["map_50"] > 0


def test_label_mapping_and_unknown_labels(shapes: CocoDetection) -> None:
    det = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0, 0, 5, 5]]),
           "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([2, 9])}  # fmt: skip
    results, dropped = detections_to_coco_results([7], [det], {1: 1, 2: 3})
    assert dropped == 1
    assert results == [
        {
            "image_id": 7,
            "category_id": 3,
            "bbox": [10.0, 20.0, 30.0, 40.0],
            "score": pytest.approx(0.9),
        }
    ]
    same, _ = detections_to_coco_results([7], [det], None)  # torchvision91: label == category id
    assert [r["category_id"] for r in same] == [2, 9]
    metric = CocoMetric(shapes.coco, shapes.label_to_cat_id)
    metric.update([det], [123456789])
    with pytest.raises(KeyError, match="123456789"):
        metric.compute()
