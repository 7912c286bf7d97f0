"""DetectionTask end to end on generated COCO-format shapes: overfitting, checkpoints, DDP mAP,
predict outputs, configs through the ``mnv3det`` CLI."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from pycocotools.coco import COCO

import mnv3det
from mnv3det import cli
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.metrics.coco import STAT_NAMES
from mnv3det.tasks.detection import DetectionTask
from mnv3det.tasks.detection_data import CocoDataModule
from mnv3det.tasks.detection_writer import DetectionPredictionWriter

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
OVERFIT_EPOCHS = 80  # one batch of 5 images per epoch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny tensors gain nothing from two, and training steps stay fast when
    the two cores are shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, one_thread):
    """Train SSDLite-Small on 5 generated images (evaluated on the same images), with checkpoints."""
    root = generate_shapes_coco(
        tmp_path_factory.mktemp("shapes") / "coco", num_train=5, num_val=5, image_size=SIZE, seed=0
    )
    out = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    data = CocoDataModule(
        root, size=SIZE, batch_size=5, num_workers=0, val_split="train2017", augment=False
    )
    task = DetectionTask(
        "small", num_classes=5, size=SIZE, lr=0.05, weight_decay=0.0, warmup_epochs=5,
        bn_momentum=0.1, print_table=False,
    )  # fmt: skip
    checkpoint = ModelCheckpoint(
        dirpath=out / "ckpt", monitor="val/map", mode="max", save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=OVERFIT_EPOCHS, check_val_every_n_epoch=OVERFIT_EPOCHS,
        num_sanity_val_steps=0, logger=False, callbacks=[checkpoint], enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out,
    )  # fmt: skip
    trainer.fit(task, data)
    return {"root": root, "task": task, "trainer": trainer, "ckpt": checkpoint, "out": out}


def test_overfit_handful_of_images_reaches_ap50(overfit) -> None:
    stats = overfit["task"].last_results["val"]
    assert stats["map_50"] >= 0.9, stats
    logged = overfit["trainer"].callback_metrics
    assert all(f"val/{name}" in logged for name in STAT_NAMES)
    assert float(logged["val/map"]) == pytest.approx(stats["map"])


def test_fit_writes_last_and_best_checkpoints_that_load_into_ssdlite(overfit) -> None:
    ckpt = overfit["ckpt"]
    last = Path(ckpt.dirpath) / "last.ckpt"
    assert last.is_file() and Path(ckpt.best_model_path).is_file()
    model = DetectionTask.weights_from_checkpoint(last).eval()
    also = mnv3det.ssdlite("small", num_classes=5, size=SIZE, weights=last).eval()
    assert also.weights_report.format == "mnv3det"
    task_model = overfit["task"].model.eval()
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 90, 150)]
    with torch.no_grad():
        expected, got, got2 = task_model(images), model(images), also(images)
    for e, g, g2 in zip(expected, got, got2, strict=True):
        assert torch.equal(e["boxes"], g["boxes"]) and torch.equal(e["labels"], g2["labels"])


def test_ddp_two_processes_same_map_as_one(overfit, tmp_path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(overfit["task"].model.state_dict(), weights)
    script = REPO / "tests" / "scripts" / "ddp_detection.py"
    results = {}
    for devices in (1, 2):  # 5 images, batch 2: the DistributedSampler repeats one image
        out = tmp_path / f"metrics_{devices}.json"
        cmd = [sys.executable, str(script), "--root", str(overfit["root"]), "--weights", str(weights),
               "--devices", str(devices), "--size", str(SIZE), "--split", "train2017", "--out", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    assert results[1]["world_size"] == 1 and results[2]["world_size"] == 2
    assert results[1]["map_50"] > 0.1  # meaningful detections, not an all-zero comparison
    for name in STAT_NAMES:
        assert results[2][name] == pytest.approx(results[1][name], abs=1e-9), name


def test_predict_writes_coco_json_and_pictures(overfit, tmp_path) -> None:
    writer = DetectionPredictionWriter(tmp_path / "pred", draw=True, draw_score_thresh=0.3)
    data = CocoDataModule(overfit["root"], size=SIZE, batch_size=4, num_workers=0, augment=False)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    predictions = trainer.predict(overfit["task"], data)
    assert sum(len(batch) for batch in predictions) == 5
    results = json.loads((tmp_path / "pred" / "detections.json").read_text())
    gt = COCO(str(Path(overfit["root"]) / "annotations" / "instances_val2017.json"))
    assert results and {r["image_id"] for r in results} <= set(gt.getImgIds())
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())
    with contextlib.redirect_stdout(io.StringIO()):
        gt.loadRes(results)  # valid COCO results format
    pictures = sorted((tmp_path / "pred" / "images").glob("*.png"))
    assert len(pictures) == 5


def test_ema_weights_are_used_for_evaluation(overfit, tmp_path) -> None:
    data = CocoDataModule(overfit["root"], size=SIZE, batch_size=3, num_workers=0, augment=False)
    task = DetectionTask(
        "small", num_classes=5, size=SIZE, lr=0.01, ema_decay=0.5, print_table=False
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, data)
    assert task.eval_model is task.ema.module
    assert int(task.ema.n_averaged) == 2
    ema_w = task.ema.module.head.regression_head.module_list[0][1].weight
    assert not torch.equal(ema_w, task.model.head.regression_head.module_list[0][1].weight)
    assert not any(p.requires_grad for p in task.ema.parameters())
    assert "val/map" in trainer.callback_metrics


def test_num_classes_must_match_data(overfit) -> None:
    data = CocoDataModule(overfit["root"], size=SIZE, batch_size=2, num_workers=0)
    task = DetectionTask("small", num_classes=91, size=SIZE, print_table=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="num_classes: 5"):
        trainer.validate(task, data, verbose=False)


@pytest.mark.parametrize(
    "config", ["ssdlite320_mnv3_large_coco.yaml", "ssdlite320_mnv3_small_coco.yaml"]
)
def test_cli_print_config(config: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(REPO / "configs" / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    assert "mnv3det.tasks.detection.DetectionTask" in text
    assert "mnv3det.tasks.detection_data.CocoDataModule" in text
    assert "lr: 0.15" in text and "max_epochs: 660" in text and "monitor: val/map" in text


def test_cli_fit_from_config_writes_last_ckpt(overfit, tmp_path, monkeypatch) -> None:
    """The shipped config, shrunk from the command line, trains and checkpoints."""
    monkeypatch.chdir(tmp_path)
    cli.main([
        "fit", "--config", str(REPO / "configs" / "ssdlite320_mnv3_small_coco.yaml"),
        "--data.root", str(overfit["root"]), "--data.init_args.label_map", "contiguous",
        "--data.init_args.size", str(SIZE), "--data.init_args.batch_size", "3",
        "--data.init_args.num_workers", "0", "--data.init_args.pin_memory", "false",
        "--model.init_args.num_classes", "5", "--model.init_args.size", str(SIZE),
        "--model.init_args.lr", "0.01", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.benchmark", "false",
    ])  # fmt: skip
    lasts = list(tmp_path.rglob("last.ckpt"))
    assert len(lasts) == 1
    assert list(tmp_path.rglob("metrics.csv")) and list(tmp_path.rglob("events.out.tfevents*"))


def test_data_module_takes_the_training_size_from_the_model(overfit, tmp_path) -> None:
    """``data.size: null`` (the configs): training images are resized to ``model.size``."""
    data = CocoDataModule(overfit["root"], size=None, batch_size=2, num_workers=0)
    task = DetectionTask("small", num_classes=5, size=(96, 64), print_table=False)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, data)
    image, _ = data.train_dataset[0]
    assert tuple(image.shape[-2:]) == (96, 64)
    assert CocoDataModule(overfit["root"]).training_size() == 320  # without a model
