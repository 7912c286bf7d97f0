"""SegmentationTask (LR-ASPP on Cityscapes, paper §6.4): CLI configs, fit/predict, overfit, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import randomize_bn_stats
from PIL import Image
from torch.utils.data import DataLoader

import mnv3det
from mnv3det.cli import main as cli_main
from mnv3det.data.cityscapes import (
    CityscapesSegmentation,
    SegmentationImageFolder,
    collate_segmentation,
)
from mnv3det.data.cityscapes_labels import PALETTE, TRAINID_TO_ID
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.tasks.segmentation import SegmentationTask, sliding_window_logits
from mnv3det.tasks.segmentation_writer import SegmentationPredictionWriter

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [
    REPO / "configs/lraspp_mnv3_large_cityscapes.yaml",
    REPO / "configs/lraspp_mnv3_small_cityscapes.yaml",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two threads on two cores that other processes also use can be 10x slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cityscapes")
    return generate_street_scenes(root, cities=("aachen", "bremen"), per_city=2, size=(64, 128))


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "mnv3det.tasks.segmentation.SegmentationTask" in text
    assert "mnv3det.tasks.segmentation_data.CityscapesDataModule" in text
    assert "monitor: val/miou" in text and "mnv3det.tasks.checkpoints.LastCheckpoint" in text
    assert "crop_size:\n    - 512\n    - 1024" in text or "- 512" in text


@pytest.mark.slow
def test_cli_fit_writes_checkpoints_and_predict_writes_label_id_pngs(scenes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's logs/ and predictions/ are relative
    config = str(REPO / "configs/lraspp_mnv3_small_cityscapes.yaml")
    small = ["--model.width_mult", "0.5", "--data.root", str(scenes), "--data.num_workers", "0"]
    small += [
        "--data.pin_memory",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
    ]
    small += ["--trainer.sync_batchnorm", "false", "--trainer.benchmark", "false"]
    cli_main(
        [
            *["fit", "--config", config, *small, "--data.crop_size", "[64, 128]"],
            *["--data.batch_size", "2", "--data.val_batch_size", "2", "--trainer.max_steps", "2"],
            *["--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0"],
            *["--trainer.log_every_n_steps", "1"],
        ]
    )
    ckpt_dir = tmp_path / "logs/lraspp_mnv3_small_cityscapes/version_0/checkpoints"
    last = ckpt_dir / "last.ckpt"
    assert last.is_file()
    assert len(list(ckpt_dir.glob("best-step2-miou*.ckpt"))) == 1
    metrics = (tmp_path / "logs/lraspp_mnv3_small_cityscapes/version_0/metrics.csv").read_text()
    assert "val/miou" in metrics and "train/loss" in metrics and "lr-SGD" in metrics
    # the checkpoint loads safely (weights_only) straight into the model
    reloaded = mnv3det.lraspp("small", width_mult=0.5, weights=last)
    assert reloaded.weights_report.loaded > 0

    predict_dir = scenes / "leftImg8bit" / "val"
    cli_main(
        [
            *["predict", "--config", config, *small],
            *["--data.predict_dir", str(predict_dir), "--ckpt_path", str(last)],
        ]
    )
    out = tmp_path / "predictions/lraspp_mnv3_small_cityscapes"
    images = sorted(predict_dir.rglob("*.png"))
    task = SegmentationTask.load_from_checkpoint(last, map_location="cpu").eval()
    for image_path in images:
        rel = image_path.relative_to(predict_dir)
        label_png = out / "labelIds" / rel.parent / rel.name
        ids = np.asarray(Image.open(label_png))
        assert ids.dtype == np.uint8 and ids.shape == (64, 128)
        # Label ids (road 7, car 26, ...), exactly the mapped train-id prediction of the model.
        image = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB")).copy())
        with torch.no_grad():
            pred = task(image.permute(2, 0, 1)[None].float() / 255).argmax(1)[0].numpy()
        np.testing.assert_array_equal(ids, TRAINID_TO_ID[pred])
        color = np.asarray(Image.open(out / "color" / rel.parent / rel.name))
        np.testing.assert_array_equal(color, PALETTE[pred])
        assert (out / "overlay" / rel.parent / (rel.stem + ".jpg")).is_file()


@pytest.mark.slow
def test_overfits_a_few_generated_scenes(tmp_path):
    root = generate_street_scenes(
        tmp_path, cities=("aachen",), per_city=2, size=(128, 256), splits=("train",), seed=1
    )
    dataset = CityscapesSegmentation(root, "train")
    L.seed_everything(0)
    task = SegmentationTask(
        arch="small", lr=0.1, warmup_steps=10, weight_decay=0.0, bn_momentum=0.1, print_table=False
    )
    train = DataLoader(dataset, batch_size=2, shuffle=True, collate_fn=collate_segmentation)
    val = DataLoader(dataset, batch_size=2, collate_fn=collate_segmentation)
    trainer = _trainer(max_steps=150, check_val_every_n_epoch=150, deterministic=True)
    trainer.fit(task, train, val)
    results = task.last_results
    present = ~torch.isnan(results["iou"])
    # road, sidewalk, building, vegetation, sky, person, car (train ids)
    assert present.nonzero().flatten().tolist() == [0, 1, 2, 8, 10, 11, 13]
    assert results["miou"] >= 0.9, results["table"]


def test_sliding_window_matches_a_single_pass_for_a_pointwise_model():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.randn(2, 3, 37, 61)
    full = conv(x)
    for window, stride in [((16, 16), (8, 12)), ((37, 61), (37, 61)), ((64, 64), (10, 10))]:
        torch.testing.assert_close(sliding_window_logits(conv, x, window, stride, 5), full)


def test_sliding_window_covers_every_pixel_and_averages_overlaps():
    calls = []

    def model(x):
        calls.append(tuple(x.shape[-2:]))
        return torch.ones(x.shape[0], 2, *x.shape[-2:])

    out = sliding_window_logits(model, torch.zeros(1, 3, 50, 70), (32, 32), (20, 20), 2)
    assert set(calls) == {(32, 32)}
    assert len(calls) == 2 * 3  # rows at 0 and 18; columns at 0, 20 and 38
    torch.testing.assert_close(out, torch.ones(1, 2, 50, 70))


def test_task_eval_with_sliding_window_on_lraspp():
    task = SegmentationTask(arch="small", width_mult=0.5, val_window=(64, 64)).eval()
    assert task.val_window_stride == (42, 42)
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        out = task.infer(x)
    assert out.shape == (1, 19, 96, 128)


def test_the_model_normalises_and_the_task_passes_images_in_0_1():
    task = SegmentationTask(arch="small", width_mult=0.5).eval()
    x = torch.rand(1, 3, 32, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(task(x), task.model(x))  # no second normalisation
        low, high = task.model.backbone((x - mean) / std).values()  # ImageNet's, in the model
        expected = task.model.classifier({"low": low, "high": high})
        expected = torch.nn.functional.interpolate(expected, size=(32, 64), mode="bilinear")
        torch.testing.assert_close(task(x), expected)
    desc = task.model_description()
    assert desc["image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert desc["image_std"] == pytest.approx([0.229, 0.224, 0.225])
    custom = SegmentationTask(arch="small", width_mult=0.5, mean=(0.5, 0.5, 0.5), std=(0.5,) * 3)
    assert custom.model.description["image_mean"] == [0.5, 0.5, 0.5]


def test_training_step_loss_ignores_255_and_survives_all_ignored_crop():
    # fp32 training step, compared exactly with the fp32 forward (bf16 autocast: test_train_speed)
    task = SegmentationTask(arch="small", width_mult=0.5, train_autocast="off")
    images = torch.rand(2, 3, 32, 64)
    masks = torch.full((2, 32, 64), 255)
    loss = task.training_step((images, masks), 0)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()  # still a graph: no crash in the optimiser step
    masks[:, :16] = 3
    logits = task(images)
    expected = torch.nn.functional.cross_entropy(logits[:, :, :16], masks[:, :16])
    torch.testing.assert_close(task.training_step((images, masks), 0), expected)


def test_bn_momentum_and_bad_arguments():
    task = SegmentationTask(arch="small", width_mult=0.5, bn_momentum=0.1)
    bns = [m for m in task.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 for m in bns)
    with pytest.raises(ValueError, match="bn_momentum"):
        SegmentationTask(arch="small", bn_momentum=0.0)
    with pytest.raises(ValueError, match="lr"):
        SegmentationTask(arch="small", lr=0.0)
    with pytest.raises(ValueError, match="val_window"):
        SegmentationTask(arch="small", val_window=(0, 10))


def test_predict_step_returns_masks_at_original_size(scenes, tmp_path):
    folder = scenes / "leftImg8bit" / "val"
    dataset = SegmentationImageFolder(folder, resize=(32, 48))  # network sees a resized image
    task = SegmentationTask(arch="small", width_mult=0.5).eval()
    batch = collate_segmentation([dataset[0], dataset[1]])
    with torch.no_grad():
        items = task.predict_step(batch, 0)
    assert len(items) == 2
    for item, name in zip(items, dataset.files[:2]):
        assert item["file_name"] == name
        assert item["pred"].shape == (64, 128) and item["pred"].dtype == torch.uint8
        assert int(item["pred"].max()) < 19
        assert item["image"].shape == (32, 48, 3)
    writer = SegmentationPredictionWriter(tmp_path / "out")
    writer.write_item(items[0])
    ids = np.asarray(Image.open(tmp_path / "out/labelIds" / Path(items[0]["file_name"])))
    np.testing.assert_array_equal(ids, TRAINID_TO_ID[items[0]["pred"].numpy()])
    overlay = Image.open(tmp_path / "out/overlay" / Path(items[0]["file_name"]).with_suffix(".jpg"))
    assert overlay.size == (128, 64)


def test_writer_maps_train_ids_to_cityscapes_label_ids(tmp_path):
    pred = torch.tensor([[0, 1, 13], [11, 10, 18]], dtype=torch.uint8)
    writer = SegmentationPredictionWriter(tmp_path, overlays=False)
    writer.write_item({"file_name": "zurich/zurich_000000_000019_leftImg8bit.png", "pred": pred})
    ids = np.asarray(Image.open(tmp_path / "labelIds/zurich/zurich_000000_000019_leftImg8bit.png"))
    assert ids.tolist() == [[7, 8, 26], [24, 23, 33]]  # road, sidewalk, car / person, sky, bicycle
    assert not (tmp_path / "overlay").exists()
    with pytest.raises(ValueError, match="alpha"):
        SegmentationPredictionWriter(tmp_path, alpha=2.0)


@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_confusion_matrix(scenes, tmp_path):
    torch.manual_seed(0)
    task = SegmentationTask(arch="small", width_mult=0.5)
    randomize_bn_stats(task.model, seed=3)
    weights = tmp_path / "weights.pth"
    torch.save(task.model.state_dict(), weights)
    script = REPO / "tests/scripts/ddp_segmentation.py"
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"ddp{devices}.json"
        cmd = [sys.executable, str(script), "--root", str(scenes), "--weights", str(weights)]
        cmd += ["--devices", str(devices), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    assert results[1]["world_size"] == 1 and results[2]["world_size"] == 2
    assert results[2]["confmat"] == results[1]["confmat"]
    assert results[2]["miou"] == pytest.approx(results[1]["miou"])
    # Every non-ignored validation pixel is counted exactly once (not one rank's half).
    valid = sum(int((mask != 255).sum()) for _, mask in CityscapesSegmentation(scenes, "val"))
    assert np.asarray(results[1]["confmat"]).sum() == valid


@pytest.mark.slow
def test_demo_runs_end_to_end_on_tiny_settings(tmp_path, capsys):
    from mnv3det.demos.segmentation import main as demo_main

    args = ["--output-dir", str(tmp_path), "--epochs", "1", "--per-city", "2"]
    args += [
        "--cities",
        "aachen",
        "--image-height",
        "64",
        "--crop-height",
        "64",
        "--batch-size",
        "2",
    ]
    args += ["--workers", "0", "--num-pictures", "2"]
    assert demo_main(args) == 0
    text = capsys.readouterr().out
    assert "per-class IoU" in text and "mIoU over the classes present" in text and "road" in text
    assert (tmp_path / "demo_segmentation.png").is_file()
    assert (tmp_path / "checkpoints/last.ckpt").is_file()
    ids = np.asarray(
        Image.open(tmp_path / "predictions/labelIds/aachen/aachen_000000_000019_leftImg8bit.png")
    )
    assert set(np.unique(ids).tolist()) <= set(TRAINID_TO_ID.tolist())


@pytest.mark.parametrize("with_description", [True, False])
def test_old_checkpoint_with_task_mean_std_loads(tmp_path, with_description):
    # Before the model normalised its input, SegmentationTask did: its hyper-parameters (and the
    # description's data facts) name the normalisation ``mean``/``std``.
    from mnv3det.models.from_checkpoint import load_model

    task = SegmentationTask(arch="small", width_mult=0.5).eval()
    old_hparams = {**task.hparams, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4)}
    description = {
        k: v for k, v in task.model_description().items() if k not in ("image_mean", "image_std")
    }
    description.update(mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in task.model.state_dict().items()},
        "hyper_parameters": old_hparams,
        "pytorch-lightning_version": L.__version__,
    }
    if with_description:
        ckpt["mnv3det"] = description
    path = tmp_path / "old.ckpt"
    torch.save(ckpt, path)
    expected = [0.5, 0.4, 0.3, 0.2, 0.3, 0.4]
    model = load_model(path)
    assert [*model.description["image_mean"], *model.description["image_std"]] == pytest.approx(
        expected
    )
    restored = SegmentationTask.load_from_checkpoint(path, map_location="cpu").eval()
    stats = restored.model.normalize.description
    assert [*stats["image_mean"], *stats["image_std"]] == pytest.approx(expected)
    x = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
