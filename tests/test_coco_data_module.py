"""CocoDataModule: loaders in torchvision's detection convention, label space, predict data,
per-epoch data stats through a real (tiny) Trainer run."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch

from mnv3det.data.coco import CocoDataError
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.tasks.detection_data import CocoDataModule


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_dm")
    return generate_shapes_coco(
        root, num_train=12, num_val=6, image_size=(72, 96), seed=0, crowd_fraction=0.5
    )


def test_loaders_and_label_space(shapes):
    dm = CocoDataModule(shapes, size=64, batch_size=4, num_workers=0, seed=0)
    assert dm.num_classes == 5  # readable before setup (LightningCLI can link it to the model)
    assert dm.label_to_cat_id == {1: 1, 2: 3, 3: 7, 4: 12}
    assert dm.class_names == ["__background__", "circle", "square", "triangle", "cross"]
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == len(targets) == 4
    assert all(image.shape == (3, 64, 64) for image in images)  # augmented and resized
    for target in targets:
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 64)).all()
    images, targets = next(iter(dm.val_dataloader()))
    assert all(image.shape == (3, 72, 96) for image in images)  # evaluation: original size
    assert targets[0]["image_id"] in dm.val_dataset.coco.imgs
    assert dm.train_dataset.num_classes == dm.num_classes


def test_uint8_batches_scale_to_the_same_floats_after_transfer(shapes):
    """Training batches travel as one uint8 tensor (stacked in the workers' shared memory) and
    ``on_after_batch_transfer`` gives exactly the float images of ``uint8_batches=False``."""
    batches = {}
    for compact in (True, False):
        dm = CocoDataModule(
            shapes, size=64, batch_size=4, num_workers=2, seed=0, uint8_batches=compact
        )
        dm.setup("fit")
        batches[compact] = list(dm.train_dataloader())
        if not compact:
            continue
        images, _ = batches[compact][0]
        assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
        assert images.shape == (4, 3, 64, 64)
        # the other loaders keep float images in a list
        val_images, _ = next(iter(dm.val_dataloader()))
        assert isinstance(val_images, list) and val_images[0].dtype == torch.float32
        assert dm.on_after_batch_transfer((val_images, None), 0)[0][0] is val_images[0]
    assert len(batches[True]) == len(batches[False]) == 3
    for (compact, targets_a), (floats, targets_b) in zip(batches[True], batches[False]):
        scaled, targets = dm.on_after_batch_transfer((compact, targets_a), 0)
        assert isinstance(scaled, list) and isinstance(floats, list) and targets is targets_a
        assert scaled[0].dtype == torch.float32 and scaled[0].shape == (3, 64, 64)
        assert torch.equal(torch.stack(scaled), torch.stack(floats))
        for a, b in zip(targets_a, targets_b):
            assert a["image_id"] == b["image_id"] and torch.equal(a["boxes"], b["boxes"])
    # a list of uint8 images (training without the resize) is scaled image by image
    ragged = [
        torch.full((3, 2, 3), 255, dtype=torch.uint8),
        torch.zeros(3, 4, 1, dtype=torch.uint8),
    ]
    out, _ = dm.on_after_batch_transfer((ragged, []), 0)
    assert [o.dtype for o in out] == [torch.float32] * 2 and out[0].eq(1).all()


def test_torchvision91_and_no_augmentation(shapes):
    dm = CocoDataModule(shapes, label_map="torchvision91", augment=False, num_workers=0)
    assert dm.num_classes == 91 and dm.label_to_cat_id[12] == 12
    dm.setup("fit")
    image, target = dm.train_dataset[0]
    assert image.shape == (3, 72, 96)
    assert set(target["labels"].tolist()) <= {1, 3, 7, 12}


def test_empty_images_skip_applies_to_training_only(shapes):
    dm = CocoDataModule(shapes, empty_images="skip", num_workers=0)
    dm.setup("fit")
    assert all(len(dm.train_dataset[i][1]["boxes"]) for i in range(len(dm.train_dataset)))
    assert len(dm.val_dataset) == 6  # COCOeval needs every validation image


def test_predict_on_val_images_with_coco_ids_or_a_folder(shapes, tmp_path):
    dm = CocoDataModule(shapes, batch_size=2, num_workers=0)
    dm.setup("predict")
    images, metas = next(iter(dm.predict_dataloader()))
    assert metas[0]["image_id"] == 1_000_001  # COCO's id, so predictions can be evaluated
    assert metas[0]["file_name"].endswith(".jpg") and metas[0]["orig_size"] == (72, 96)
    assert images[0].shape == (3, 72, 96)
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("x.jpg", "y.jpg"):
        (folder / name).write_bytes((shapes / "val2017" / "000001000001.jpg").read_bytes())
    dm = CocoDataModule(shapes, predict_dir=folder, num_workers=0)
    dm.setup("predict")
    assert [m["file_name"] for _, m in dm.predict_dataset] == ["x.jpg", "y.jpg"]


def test_train_and_val_must_share_categories(shapes, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(shapes / split)
        doc = json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
        if split == "val2017":  # one more category: labels would shift
            doc["categories"].append({"id": 2, "name": "extra"})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    dm = CocoDataModule(root, num_workers=0)
    with pytest.raises(CocoDataError, match="different categories"):
        dm.setup("fit")


def test_argument_errors(shapes, tmp_path):
    with pytest.raises(ValueError, match="label_map"):
        CocoDataModule(shapes, label_map="coco")
    with pytest.raises(FileNotFoundError, match="annotation file"):
        _ = CocoDataModule(tmp_path).num_classes


class _Tiny(L.LightningModule):
    """Just enough of a model to drive the loops: a loss from one parameter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        assert isinstance(images, list) and isinstance(targets, list)
        return (self.w - 1) ** 2

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_stats_reported_once_at_the_end_of_fit(shapes, caplog, tmp_path):
    dm = CocoDataModule(shapes, size=48, batch_size=4, num_workers=0, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(_Tiny(), datamodule=dm)
    assert not any(type(cb).__name__ == "DatasetStatsReporter" for cb in trainer.callbacks)
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[data]")]
    reports = [r for r in reports if not r.startswith("[data] train:")]  # the start's batch line
    assert len(reports) == 1  # once, at the end of the run (not per epoch)
    assert "CocoDetection[train2017]" in reports[0] and "CocoDetection[val2017]" in reports[0]
    assert "crowd boxes not trained on" in reports[0]
