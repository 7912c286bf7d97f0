"""Training on any number of images: the incomplete last batch is left out (as torchvision's
recipe), a set smaller than one batch is a one-line error, and the ``[data] train:`` line says
what an epoch uses."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mnv3det.data.sampling import TrainSetTooSmallError, epoch_plan
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.tasks.detection import DetectionTask
from mnv3det.tasks.detection_data import CocoDataModule


def test_epoch_plan_counts_batches_and_the_tail() -> None:
    assert epoch_plan(9, 4) == (
        "train: 9 images, batch 4: 2 batches per epoch, the last 1 image of each epoch's order "
        "is left out (drop_last, as torchvision's recipe; the order is shuffled, so other "
        "images each epoch)"
    )
    assert epoch_plan(8, 4).endswith("2 batches per epoch, every image used")
    assert "the last 3 images" in epoch_plan(11, 4)
    # DDP: ceil(9 / 2) = 5 each (one repeated), one batch of 4 per process, 1 left out
    plan = epoch_plan(9, 4, world=2)
    assert "9 images over 2 processes (5 each, 1 repeated to make them equal)" in plan
    assert "1 batch per epoch per process, the last 1 image of each process's share" in plan
    assert epoch_plan(3, 4, short_set_ok=True) == "train: 3 images, batch 4: 1 batch of 3 per epoch"


@pytest.mark.parametrize(("size", "world"), [(3, 1), (5, 2)])
def test_a_set_smaller_than_one_batch_is_an_error_naming_the_fix(size, world) -> None:
    with pytest.raises(TrainSetTooSmallError) as err:
        epoch_plan(size, 4, world=world)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert "data.batch_size 4" in message and f"{size} images" in message
    assert f"--data.batch_size {-(-size // world)} or lower" in message


@pytest.fixture(scope="module")
def nine_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "coco"
    return generate_shapes_coco(root, num_train=9, num_val=2, image_size=(96, 80), seed=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_detection_loader_leaves_the_tail_out_every_epoch(nine_images, workers) -> None:
    dm = CocoDataModule(nine_images, size=64, batch_size=4, num_workers=workers, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 2 and dm.train_plan.startswith("train: 9 images, batch 4: 2 batches")
    left_out = set()
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        batches = [images for images, _ in loader]
        assert [len(b) for b in batches] == [4, 4]
        order = [i for i, _ in loader.sampler]
        left_out.add(order[-1])
    assert len(left_out) > 1  # shuffled: not always the same image


def test_detection_set_smaller_than_a_batch_is_refused(nine_images) -> None:
    dm = CocoDataModule(nine_images, size=64, batch_size=10, num_workers=0, seed=0)
    dm.setup("fit")
    with pytest.raises(TrainSetTooSmallError, match=r"data\.batch_size 10"):
        dm.train_dataloader()


@pytest.mark.slow
def test_detection_fit_with_a_last_batch_of_one_image(nine_images, tmp_path, caplog) -> None:
    """9 images, batch 4: used to fail in BatchNorm at the end of the first epoch."""
    torch.manual_seed(0)
    task = DetectionTask(arch="small", num_classes=5, size=96, width_mult=0.5, warmup_epochs=0)
    dm = CocoDataModule(nine_images, batch_size=4, num_workers=0, seed=0, label_map="contiguous")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 4  # 2 full batches per epoch, the 1-image tail left out
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[data] train:")]
    assert len(lines) == 1 and "the last 1 image of each epoch's order is left out" in lines[0]


@pytest.mark.slow
def test_cli_names_the_batch_size_in_one_line(tmp_path) -> None:
    root = generate_shapes_coco(tmp_path / "coco", num_train=3, num_val=2, image_size=(96, 80))
    config = Path(__file__).resolve().parents[1] / "configs/ssdlite320_mnv3_small_coco.yaml"
    args = [
        *["--config", str(config), "--data.root", str(root), "--data.batch_size", "4"],
        *["--data.label_map", "contiguous", "--data.num_workers", "0", "--model.num_classes", "5"],
        *["--model.size", "96", "--model.width_mult", "0.5", "--trainer.accelerator", "cpu"],
        *["--trainer.devices", "1", "--trainer.num_sanity_val_steps", "0"],
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mnv3det.cli", "fit", *args],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mnv3det fit: error")]
    assert len(errors) == 1 and "fewer than data.batch_size 4" in errors[0], proc.stderr[-2000:]
    assert "--data.batch_size 3 or lower" in errors[0]


def test_images_skipped_at_setup_are_not_counted(tmp_path) -> None:
    """on_error: skip leaves bad images out before sampling: 6 images, 3 missing -> 3 < batch 4."""
    root = generate_shapes_coco(tmp_path / "coco", num_train=6, num_val=2, image_size=(96, 80))
    for path in sorted((root / "train2017").iterdir())[:3]:
        path.unlink()
    dm = CocoDataModule(root, size=64, batch_size=4, num_workers=0, seed=0, on_error="skip")
    dm.setup("fit")
    with pytest.raises(TrainSetTooSmallError, match="has 3 images"):
        dm.train_dataloader()
    dm = CocoDataModule(root, size=64, batch_size=2, num_workers=0, seed=0, on_error="skip")
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1
    assert dm.train_plan.startswith("train: 3 images, batch 2: 1 batch per epoch, the last 1")
