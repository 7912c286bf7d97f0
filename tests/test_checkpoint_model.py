"""Checkpoints know their model: train -> .ckpt -> load_model -> ONNX, same architecture and outputs.

A DetectionTask at a non-default input size and a SegmentationTask with non-default pooling,
dilation and low tap are trained for two steps on generated data, saved, rebuilt by
:func:`mnv3det.models.from_checkpoint.load_model` without any argument, and exported through
``mnv3det export --checkpoint``; contradicting arguments are errors naming both values; a
torchvision LR-ASPP checkpoint loads with nothing but ``lraspp("large", weights=...)``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from conftest import randomize_bn_stats
from test_inference import assert_same_detections, spread_head

import mnv3det
from mnv3det.cli import main as cli_main
from mnv3det.cli.export import main as export_main
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.deploy.wrappers import SegmenterDeploy, dense_to_list
from mnv3det.models.from_checkpoint import load_model, save_model
from mnv3det.tasks.detection import DetectionTask
from mnv3det.tasks.detection_data import CocoDataModule
from mnv3det.tasks.segmentation import SegmentationTask
from mnv3det.tasks.segmentation_data import CityscapesDataModule
from mnv3det.weights import CheckpointConflictError, read_checkpoint

ort = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
DET_SIZE = 96  # not the default 320: must survive save -> load -> export


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit_and_save(task: L.LightningModule, data: L.LightningDataModule, path: Path) -> Path:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=path.parent,
    )  # fmt: skip
    trainer.fit(task, data)
    if isinstance(task, DetectionTask):
        spread_head(task.model)  # distinct scores: detections comparable one to one
    trainer.save_checkpoint(path)  # calls the task's on_save_checkpoint
    return path


@pytest.fixture(scope="module")
def detection(tmp_path_factory) -> dict:
    root = generate_shapes_coco(
        tmp_path_factory.mktemp("shapes") / "coco", num_train=4, num_val=2, image_size=80, seed=0
    )
    L.seed_everything(0)
    data = CocoDataModule(root, size=DET_SIZE, batch_size=2, num_workers=0, augment=False)
    data.setup("fit")
    task = DetectionTask(
        "small", num_classes=data.num_classes, size=DET_SIZE, width_mult=0.5, reduced_tail=True,
        lr=0.01, warmup_epochs=0, score_thresh=0.05, detections_per_img=50, print_table=False,
    )  # fmt: skip
    ckpt = _fit_and_save(task, data, tmp_path_factory.mktemp("det") / "det.ckpt")
    return {"task": task, "ckpt": ckpt, "root": root, "data": data}


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory) -> dict:
    root = generate_street_scenes(
        tmp_path_factory.mktemp("city"), cities=("aachen",), per_city=2, size=(64, 128)
    )
    L.seed_everything(0)
    data = CityscapesDataModule(
        root, crop_size=(64, 128), batch_size=2, num_workers=0, pin_memory=False
    )
    task = SegmentationTask(
        "small", width_mult=0.5, reduced_tail=False, dilated=False, pooling="paper",
        low_tap="stage3_first", lr=0.01, print_table=False,
    )  # fmt: skip
    ckpt = _fit_and_save(task, data, tmp_path_factory.mktemp("seg") / "seg.ckpt")
    return {"task": task, "ckpt": ckpt}


def test_detection_checkpoint_rebuilds_the_exact_model_and_exports(detection, tmp_path) -> None:
    task, ckpt = detection["task"], detection["ckpt"]
    description = read_checkpoint(ckpt).description
    assert description["builder"] == "ssdlite" and description["size"] == DET_SIZE
    assert description["label_map"] == detection["data"].label_to_cat_id
    assert description["class_names"] == detection["data"].class_names
    model = load_model(ckpt)  # no argument: everything from the checkpoint
    assert model.size == (DET_SIZE, DET_SIZE) and model.backbone.arch == "small"
    assert model.backbone.reduced_tail and model.backbone.width_mult == 0.5
    assert model.score_thresh == 0.05 and model.detections_per_img == 50
    assert not model.training and model.description == description
    # the task keeps some convolutions fp32 under CPU autocast (same layer, another class name)
    assert str(model) == str(task.model).replace("Float32DepthwiseConv2d", "Conv2d")
    images = torch.rand(2, 3, 120, 90, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = task.model.eval()(images)
        out = model(images)
    for a, b in zip(ref, out, strict=True):
        assert len(a["scores"]) > 0
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    # ... and through `mnv3det export --checkpoint` (no --size: the checkpoint's is used)
    onnx = tmp_path / "det.onnx"
    assert (
        export_main(["--model", "ssdlite", "--checkpoint", str(ckpt), "--output", str(onnx)]) == 0
    )
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    dense = session.run(None, {"images": images.numpy()})
    for a, b in zip(ref, dense_to_list(*dense), strict=True):
        assert_same_detections(a, b, box_tol=1e-2, score_tol=1e-4)


def test_segmentation_checkpoint_rebuilds_the_exact_model_and_exports(
    segmentation, tmp_path
) -> None:
    task, ckpt = segmentation["task"], segmentation["ckpt"]
    model = load_model(ckpt)
    desc = model.description
    assert (desc["pooling"], desc["dilated"], desc["low_tap"]) == ("paper", False, "stage3_first")
    assert (desc["reduced_tail"], desc["width_mult"], desc["output_stride"]) == (False, 0.5, 32)
    assert desc["class_names"] == list(task.class_names) and len(desc["label_map"]) == 19
    # the task keeps some convolutions fp32 under CPU autocast (same layer, another class name)
    assert str(model) == str(task.model).replace("Float32DepthwiseConv2d", "Conv2d")
    # export's example size: the paper pooling's window clamp makes the exported size static
    images = torch.rand(1, 3, 256, 512, generator=torch.Generator().manual_seed(0))
    assert desc["image_mean"] == task.model.normalize.description["image_mean"]
    deploy = SegmenterDeploy(model)  # the model normalises its [0, 1] input itself
    with torch.no_grad():
        ref = task.eval()(images)
        out = deploy(images)
    assert torch.equal(ref, out)
    onnx = tmp_path / "seg.onnx"
    assert export_main(["--model", "lraspp", "--checkpoint", str(ckpt), "--output", str(onnx)]) == 0
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    assert np.abs(logits - ref.numpy()).max() < 1e-4


def test_explicit_argument_contradicting_the_checkpoint_names_both_values(
    detection, segmentation, capsys
) -> None:
    with pytest.raises(CheckpointConflictError, match=rf"size=320 .*{DET_SIZE}") as info:
        mnv3det.ssdlite(size=320, weights=detection["ckpt"])
    assert str(detection["ckpt"]) in str(info.value)
    with pytest.raises(CheckpointConflictError, match=r"arch='large'.*arch='small'"):
        load_model(detection["ckpt"], arch="large")
    with pytest.raises(CheckpointConflictError, match=r"pooling='global'.*pooling='paper'"):
        mnv3det.lraspp(pooling="global", weights=segmentation["ckpt"])
    with pytest.raises(CheckpointConflictError, match=r"dilated=True.*dilated=False"):
        mnv3det.lraspp("small", dilated=True, weights=segmentation["ckpt"])
    # agreeing arguments and post-processing changes are fine
    model = mnv3det.ssdlite("small", size=DET_SIZE, score_thresh=0.5, weights=detection["ckpt"])
    assert model.score_thresh == 0.5
    argv = ["--model", "ssdlite", "--checkpoint", str(detection["ckpt"]), "--size", "320"]
    assert export_main([*argv, "--output", "unused.onnx"]) == 2
    err = capsys.readouterr().err
    assert "size=320" in err and f"size={DET_SIZE}" in err and str(detection["ckpt"]) in err


def test_checkpoint_without_description_uses_its_hyper_parameters(detection, tmp_path) -> None:
    """A .ckpt written before checkpoint["mnv3det"] existed still rebuilds its model."""
    old = torch.load(detection["ckpt"], map_location="cpu", weights_only=True)
    del old["mnv3det"]
    torch.save(old, tmp_path / "old.ckpt")
    model = load_model(tmp_path / "old.ckpt")
    assert (
        model.size == (DET_SIZE, DET_SIZE)
        and model.num_classes == detection["task"].model.num_classes
    )


def test_save_model_writes_a_described_weights_file(segmentation, tmp_path) -> None:
    model = load_model(segmentation["ckpt"])
    path = save_model(model, tmp_path / "seg.pt")
    again = mnv3det.lraspp(weights=path)
    assert again.description == model.description
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_demo_style_checkpoint_works_with_ckpt_path_and_the_shipped_config(
    detection, tmp_path, monkeypatch
) -> None:
    """A task built in Python (as the demo does) -> .ckpt -> `mnv3det validate --ckpt_path`."""
    monkeypatch.chdir(tmp_path)
    cli_main([
        "validate", "--config", str(REPO / "configs" / "ssdlite320_mnv3_small_coco.yaml"),
        "--data.root", str(detection["root"]), "--data.init_args.label_map", "contiguous",
        "--data.init_args.size", str(DET_SIZE), "--data.init_args.num_workers", "0",
        "--data.init_args.pin_memory", "false", "--data.init_args.val_split", "val2017",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
        "--trainer.benchmark", "false", "--ckpt_path", str(detection["ckpt"]),
    ])  # fmt: skip


def test_lraspp_reads_everything_from_a_torchvision_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21
    )
    randomize_bn_stats(tv, seed=1).eval()
    path = tmp_path / "lraspp_tv.pth"
    torch.save(tv.state_dict(), path)
    ours = mnv3det.lraspp("large", weights=path).eval()
    desc = ours.description
    assert (desc["num_classes"], desc["reduced_tail"], desc["low_tap"]) == (
        21,
        False,
        "stage3_first",
    )
    assert desc["dilated"] is True
    # ours takes [0, 1] and normalises inside (ImageNet); torchvision's takes normalised input
    x = torch.rand(1, 3, 96, 128)
    normalised = torchvision.transforms.functional.normalize(
        x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(normalised)["out"], atol=1e-5)
    assert load_model(path).description == desc
