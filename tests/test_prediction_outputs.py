"""Traceable predictions (issue 9): detection results carry file names and COCO image ids (so
``COCO.loadRes`` and ``COCOeval`` take ``detections.json`` as it is); Cityscapes predictions are
laid out so the official ``cityscapesscripts`` evaluation runs on ``<out>/labelIds``."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mnv3det.data.cityscapes_labels import ID_TO_TRAINID, TRAINID_TO_ID
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.tasks.detection import DetectionTask
from mnv3det.tasks.detection_data import CocoDataModule
from mnv3det.tasks.detection_writer import DetectionPredictionWriter
from mnv3det.tasks.segmentation import SegmentationTask
from mnv3det.tasks.segmentation_data import CityscapesDataModule
from mnv3det.tasks.segmentation_writer import SegmentationPredictionWriter

REPO = Path(__file__).resolve().parents[1]
SIZE = 96  # SSDLite input side: small, so CPU predictions take a fraction of a second


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from a second thread on two cores shared with other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pred_coco") / "coco"
    return generate_shapes_coco(root, num_train=3, num_val=5, image_size=(72, 96), seed=0)


@pytest.fixture(scope="module")
def det_task() -> DetectionTask:
    # Untrained: its scores are near 1/5, so every image gets detections above score_thresh.
    torch.manual_seed(0)
    return DetectionTask("small", num_classes=5, size=SIZE, print_table=False).eval()


def _trainer(callback: L.Callback) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip


def _predict_detections(
    task: DetectionTask, root: Path, out: Path, predict_dir: Path | None, draw: bool = False
) -> tuple[list[dict], dict]:
    writer = DetectionPredictionWriter(out, draw=draw, draw_score_thresh=0.0)
    data = CocoDataModule(root, size=SIZE, batch_size=2, num_workers=0, predict_dir=predict_dir)
    _trainer(writer).predict(task, data, return_predictions=False)
    assert writer.written == out / "detections.json"
    assert writer.images_written == out / "images.json"
    return json.loads(writer.written.read_text()), json.loads(writer.images_written.read_text())


def _coco_eval(ann_file: Path, results_file: Path) -> list[float]:
    """``COCO(ann_file).loadRes(results_file)`` and a full ``COCOeval``; its 12 numbers."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        evaluation = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(v) for v in evaluation.stats]


@pytest.mark.parametrize("where", ["val_split", "split_folder"])
def test_coco_split_predictions_use_coco_ids_and_load_in_cocoeval(
    where, coco_root, det_task, tmp_path
) -> None:
    # predict_dir unset (the validation split) or given as the split's image folder: both are
    # the COCO split, so the COCO image ids are used.
    predict_dir = None if where == "val_split" else coco_root / "val2017"
    out = tmp_path / "pred"
    results, index = _predict_detections(det_task, coco_root, out, predict_dir, draw=True)
    ann_file = coco_root / "annotations" / "instances_val2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    assert sorted(im["id"] for im in index["images"]) == sorted(gt.getImgIds())
    for image in index["images"]:
        info = gt.imgs[image["id"]]
        assert image["file_name"] == info["file_name"]
        assert (image["width"], image["height"]) == (info["width"], info["height"])
        assert (coco_root / "val2017" / image["file_name"]).is_file()
    assert index["categories"] == [
        {"id": c["id"], "name": c["name"]} for c in gt.loadCats(gt.getCatIds())
    ]
    assert results, "an untrained SSDLite gives detections on every image"
    assert {r["image_id"] for r in results} == set(gt.getImgIds())
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())
    for r in results:
        assert set(r) == {"image_id", "file_name", "category_id", "bbox", "score"}
        assert r["file_name"] == gt.imgs[r["image_id"]]["file_name"]
    assert len(_coco_eval(ann_file, out / "detections.json")) == 12
    assert len(list((out / "images").glob("*.png"))) == 5


def test_split_folder_elsewhere_leaves_out_unlisted_files(coco_root, det_task, tmp_path) -> None:
    # A copy of the split beside its annotation file, outside data.root, with one extra image:
    # still recognised as the split; the file the annotation does not list has no id to carry.
    copy = tmp_path / "copy"
    shutil.copytree(coco_root / "val2017", copy / "val2017")
    shutil.copytree(coco_root / "annotations", copy / "annotations")
    shutil.copy(copy / "val2017" / "000001000001.jpg", copy / "val2017" / "extra.jpg")
    results, index = _predict_detections(det_task, coco_root, tmp_path / "p", copy / "val2017")
    ann_file = copy / "annotations" / "instances_val2017.json"
    listed = {im["id"]: im["file_name"] for im in json.loads(ann_file.read_text())["images"]}
    assert {im["id"]: im["file_name"] for im in index["images"]} == listed
    assert {r["image_id"] for r in results} == set(listed)
    assert len(_coco_eval(ann_file, tmp_path / "p" / "detections.json")) == 12


def test_folder_with_subfolders_and_duplicate_base_names(coco_root, det_task, tmp_path) -> None:
    folder = tmp_path / "my images"
    sources = sorted((coco_root / "val2017").glob("*.jpg"))
    layout = {"x.jpg": 0, "a/x.jpg": 1, "b/x.jpg": 2, "b/c/x.jpg": 3, "b/y.jpg": 4}
    for rel, source in layout.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[source], folder / rel)
    out = tmp_path / "pred"
    results, index = _predict_detections(det_task, coco_root, out, folder, draw=True)
    names = [im["file_name"] for im in index["images"]]
    assert sorted(names) == sorted(layout)  # relative, "/"-separated, unique
    assert [im["id"] for im in index["images"]] == list(range(len(layout)))
    by_id = {im["id"]: im for im in index["images"]}
    assert all((folder / name).is_file() for name in names)
    assert {r["file_name"] for r in results} == set(layout)
    for r in results:
        assert r["file_name"] == by_id[r["image_id"]]["file_name"]
    assert {(im["width"], im["height"]) for im in index["images"]} == {(96, 72)}
    # the pictures keep the sub-folders, so the four x.jpg do not overwrite each other
    pictures = sorted(p.relative_to(out / "images").as_posix() for p in out.rglob("*.png"))
    assert pictures == sorted(str(Path(rel).with_suffix(".png").as_posix()) for rel in layout)


def one_step_checkpoint(coco_root, tmp_path, **task_kwargs) -> tuple[Path, CocoDataModule]:
    """A DetectionTask checkpoint after one training step on ``coco_root`` (and its data)."""
    data = CocoDataModule(coco_root, size=SIZE, batch_size=3, num_workers=0, augment=False)
    torch.manual_seed(0)
    task = DetectionTask(
        "small", num_classes=5, size=SIZE, lr=0.01, print_table=False, **task_kwargs
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, data


def test_cli_predict_writes_results_that_load_in_cocoeval(coco_root, tmp_path) -> None:
    """``mnv3det predict`` (a subprocess) on the split folder with a checkpoint from a short fit."""
    ckpt, _ = one_step_checkpoint(coco_root, tmp_path)
    cmd = [
        sys.executable, "-c", "import sys; from mnv3det.cli import main; sys.exit(main())",
        "predict", "--config", str(REPO / "configs" / "ssdlite320_mnv3_small_coco.yaml"),
        "--data.root", str(coco_root), "--data.init_args.label_map", "contiguous",
        "--data.init_args.size", str(SIZE), "--data.init_args.batch_size", "3",
        "--data.init_args.num_workers", "0", "--data.init_args.pin_memory", "false",
        "--data.init_args.predict_dir", str(coco_root / "val2017"),
        "--model.init_args.num_classes", "5", "--model.init_args.size", str(SIZE),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
        "--trainer.benchmark", "false", "--ckpt_path", str(ckpt),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "predictions" / "ssdlite320_mnv3_small_coco"
    results = json.loads((out / "detections.json").read_text())
    index = json.loads((out / "images.json").read_text())
    ann_file = coco_root / "annotations" / "instances_val2017.json"
    gt_images = json.loads(ann_file.read_text())["images"]
    assert {(im["id"], im["file_name"]) for im in index["images"]} == {
        (im["id"], im["file_name"]) for im in gt_images
    }
    assert results and all((coco_root / "val2017" / r["file_name"]).is_file() for r in results)
    assert len(_coco_eval(ann_file, out / "detections.json")) == 12


# ---------------------------------------------------------------------------- segmentation
CS_PATTERN = "{city}_{seq}_{frame}*.png"  # cityscapesscripts' getPrediction rule


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pred_cityscapes")
    root = generate_street_scenes(
        root, cities=("aachen", "bremen"), per_city=2, size=(64, 128), splits=("val",)
    )
    # The official script also reads *_gtFine_instanceIds.png (for the iIoU); the generated
    # scenes have no instances, and an instanceIds image without instances is the labelIds one.
    for gt in root.glob("gtFine/val/*/*_gtFine_labelIds.png"):
        shutil.copy(gt, gt.with_name(gt.name.replace("_labelIds", "_instanceIds")))
    return root


@pytest.fixture(scope="module")
def seg_predictions(scenes, tmp_path_factory) -> Path:
    """``Trainer.predict`` of an untrained LR-ASPP on ``leftImg8bit/val`` with the writer."""
    out = tmp_path_factory.mktemp("seg_pred") / "out"
    torch.manual_seed(0)
    task = SegmentationTask(arch="small", width_mult=0.5)
    # A resized network input: the written masks must still be at the original size.
    data = CityscapesDataModule(
        scenes, predict_dir=scenes / "leftImg8bit" / "val", num_workers=0, pin_memory=False,
        val_batch_size=3, val_resize=(48, 96),
    )  # fmt: skip
    _trainer(SegmentationPredictionWriter(out)).predict(task, data, return_predictions=False)
    return out


def _ground_truth(root: Path) -> list[Path]:
    return sorted(root.glob("gtFine/val/*/*_gtFine_labelIds.png"))


def _matches(results: Path, gt: Path) -> list[Path]:
    """The prediction files cityscapesscripts' ``getPrediction`` finds for ``gt``."""
    city, seq, frame = gt.name.split("_")[:3]
    pattern = CS_PATTERN.format(city=city, seq=seq, frame=frame)
    found = []
    for folder, _, files in os.walk(results):
        found += [Path(folder) / name for name in fnmatch.filter(files, pattern)]
    return found


def test_segmentation_layout_follows_the_official_matching_rule(scenes, seg_predictions) -> None:
    gts = _ground_truth(scenes)
    assert len(gts) == 4
    labels = seg_predictions / "labelIds"
    for gt in gts:
        found = _matches(labels, gt)
        assert len(found) == 1, (gt, found)  # exactly one prediction per ground-truth file
        pred = np.asarray(Image.open(found[0]))
        gt_ids = np.asarray(Image.open(gt))
        assert pred.dtype == np.uint8 and pred.shape == gt_ids.shape  # original size
        assert set(np.unique(pred).tolist()) <= set(TRAINID_TO_ID.tolist())  # ids, not train ids
        city = gt.parent.name
        assert found[0] == labels / city / gt.name.replace("_gtFine_labelIds", "_leftImg8bit")
        assert (seg_predictions / "color" / city / found[0].name).is_file()
        assert (seg_predictions / "overlay" / city / found[0].with_suffix(".jpg").name).is_file()
    # Why the evaluation is pointed at labelIds/: the colour masks carry the same names.
    assert len(_matches(seg_predictions, gts[0])) == 2


def _official_evaluation(root: Path, results: Path, export_dir: Path) -> dict:
    """Run ``csEvalPixelLevelSemanticLabeling`` as documented; its exported JSON."""
    pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    # cityscapesscripts 2.3.0 calls numpy.in1d, which NumPy 2.4 removed (see the README).
    code = (
        "import numpy, sys\n"
        "if not hasattr(numpy, 'in1d'): numpy.in1d = numpy.isin\n"
        "from cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling import main\n"
        "sys.exit(main())\n"
    )
    env = dict(
        os.environ, CITYSCAPES_DATASET=str(root), CITYSCAPES_RESULTS=str(results),
        CITYSCAPES_EXPORT_DIR=str(export_dir),
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((export_dir / "resultPixelLevelSemanticLabeling.json").read_text())


def test_official_evaluation_runs_on_the_label_ids_folder(scenes, seg_predictions, tmp_path):
    result = _official_evaluation(scenes, seg_predictions / "labelIds", tmp_path)
    # It read our files: its confusion matrix (label id x label id) is the one of the PNGs.
    confmat = np.asarray(result["confMatrix"], dtype=np.int64)
    expected = np.zeros_like(confmat)
    for gt in _ground_truth(scenes):
        (pred,) = _matches(seg_predictions / "labelIds", gt)
        gt_ids = np.asarray(Image.open(gt)).astype(np.int64).ravel()
        pred_ids = np.asarray(Image.open(pred)).astype(np.int64).ravel()
        np.add.at(expected, (gt_ids, pred_ids), 1)
    np.testing.assert_array_equal(confmat, expected)


def test_official_evaluation_scores_a_perfect_prediction_one(scenes, tmp_path):
    # The ground truth, as train ids, through the writer: every class present scores IoU 1, so
    # each prediction file is paired with its own ground truth and the ids are the right ones.
    writer = SegmentationPredictionWriter(tmp_path / "out", color=True, overlays=False)
    for gt in _ground_truth(scenes):
        train_ids = ID_TO_TRAINID[np.asarray(Image.open(gt))]
        name = f"{gt.parent.name}/{gt.name.replace('_gtFine_labelIds', '_leftImg8bit')}"
        writer.write_item({"file_name": name, "pred": torch.from_numpy(train_ids)})
    result = _official_evaluation(scenes, tmp_path / "out" / "labelIds", tmp_path)
    present = {k: v for k, v in result["classScores"].items() if v == v}  # not NaN
    assert {"road", "car", "sky"} <= set(present)
    assert all(v == pytest.approx(1.0) for v in present.values()), present
    assert result["averageScoreClasses"] == pytest.approx(1.0)


def test_cli_predict_without_annotations_uses_the_checkpoints_label_map(
    coco_root, tmp_path
) -> None:
    """A folder of images and a data root with no annotation file: the category ids and names
    come from the label map stored in the checkpoint."""
    ckpt, data = one_step_checkpoint(coco_root, tmp_path, score_thresh=0.0)
    label_map = data.label_to_cat_id
    assert sorted(label_map.values()) != list(range(1, len(label_map) + 1))  # ids have gaps
    images = tmp_path / "phone_photos"
    images.mkdir()
    for path in sorted((coco_root / "val2017").iterdir())[:3]:
        (images / path.name).write_bytes(path.read_bytes())
    empty_root = tmp_path / "no_annotations"
    empty_root.mkdir()
    cmd = [
        sys.executable, "-m", "mnv3det.cli",
        "predict", "--config", str(REPO / "configs" / "ssdlite320_mnv3_small_coco.yaml"),
        "--data.root", str(empty_root), "--data.init_args.label_map", "contiguous",
        "--data.init_args.size", str(SIZE), "--data.init_args.num_workers", "0",
        "--data.init_args.pin_memory", "false", "--data.init_args.predict_dir", str(images),
        "--model.init_args.num_classes", "5", "--model.init_args.size", str(SIZE),
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--ckpt_path", str(ckpt),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "predictions" / "ssdlite320_mnv3_small_coco"
    results = json.loads((out / "detections.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(label_map.values())
    categories = json.loads((out / "images.json").read_text())["categories"]
    names = data.class_names
    assert {(c["id"], c["name"]) for c in categories} == {
        (cat, names[label]) for label, cat in label_map.items()
    }
