"""CityscapesSegmentation and CityscapesDataModule: layout, id mapping, errors naming files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnv3det.data.cityscapes import (
    CityscapesDataError,
    CityscapesLabelNotFoundError,
    CityscapesSegmentation,
    SegmentationImageFolder,
    collate_segmentation,
)
from mnv3det.data.cityscapes_labels import ID_TO_TRAINID
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.tasks.segmentation_data import CityscapesDataModule

STEM = "aachen_000000_000019"


def _write_pair(
    root: Path,
    label: np.ndarray,
    split: str = "train",
    kind: str = "labelIds",
    image_size: tuple[int, int] | None = None,
    stem: str = STEM,
) -> tuple[Path, Path]:
    city = stem.split("_")[0]
    h, w = image_size or label.shape
    img_dir = root / "leftImg8bit" / split / city
    gt_dir = root / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image_path = img_dir / f"{stem}_leftImg8bit.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_path)
    label_path = gt_dir / f"{stem}_gtFine_{kind}.png"
    Image.fromarray(label.astype(np.uint8)).save(label_path)
    return image_path, label_path


def test_label_ids_are_mapped_to_train_ids(tmp_path: Path) -> None:
    ids = np.array([[0, 1, 3, 7], [8, 11, 21, 23], [24, 26, 33, 9]], dtype=np.uint8)
    _write_pair(tmp_path, ids)
    ds = CityscapesSegmentation(tmp_path, "train")
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 3, 4)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert mask.dtype == torch.long
    expected = [[255, 255, 255, 0], [1, 2, 8, 10], [11, 13, 18, 255]]
    assert mask.tolist() == expected
    assert ds.label_types == ["labelIds"]
    assert ds.files[0][1].name == f"{STEM}_gtFine_labelIds.png"


def test_label_train_ids_are_accepted_and_preferred(tmp_path: Path) -> None:
    ids = np.array([[7, 26], [0, 23]], dtype=np.uint8)
    _write_pair(tmp_path, ids)
    # A ready train-id file beside it: "auto" prefers it; here it deliberately differs (all 2)
    # so we can tell which file was read.
    train = np.array([[2, 2], [255, 2]], dtype=np.uint8)
    Image.fromarray(train).save(
        tmp_path / "gtFine/train/aachen" / f"{STEM}_gtFine_labelTrainIds.png"
    )
    assert CityscapesSegmentation(tmp_path)[0][1].tolist() == train.tolist()
    assert (
        CityscapesSegmentation(tmp_path, label_type="labelTrainIds")[0][1].tolist()
        == train.tolist()
    )
    by_ids = CityscapesSegmentation(tmp_path, label_type="labelIds")[0][1]
    assert by_ids.tolist() == [[0, 13], [255, 10]]


def test_missing_label_file_names_the_file(tmp_path: Path) -> None:
    _, label_path = _write_pair(tmp_path, np.zeros((4, 4)))
    label_path.unlink()
    with pytest.raises(CityscapesLabelNotFoundError, match=f"{STEM}_gtFine_labelIds.png") as err:
        CityscapesSegmentation(tmp_path, "train")
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path) in str(err.value)
    _write_pair(tmp_path, np.zeros((4, 4)))
    with pytest.raises(FileNotFoundError, match=f"{STEM}_gtFine_labelTrainIds.png"):
        CityscapesSegmentation(tmp_path, "train", label_type="labelTrainIds")


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    image_path, label_path = _write_pair(tmp_path, np.zeros((4, 6)), image_size=(4, 5))
    with pytest.raises(CityscapesDataError, match="same size") as err:
        CityscapesSegmentation(tmp_path)  # found by the check at construction
    assert str(image_path) in str(err.value) and str(label_path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_label_id_names_the_file(tmp_path: Path) -> None:
    _, label_path = _write_pair(tmp_path, np.array([[7, 200], [34, 26]]))
    with pytest.raises(CityscapesDataError, match=r"\[34, 200\]") as err:
        CityscapesSegmentation(tmp_path)[0]
    assert str(label_path) in str(err.value)
    assert "label ids" in str(err.value)


def test_unknown_train_id_names_the_file(tmp_path: Path) -> None:
    _, label_path = _write_pair(tmp_path, np.array([[0, 18], [19, 255]]), kind="labelTrainIds")
    with pytest.raises(CityscapesDataError, match=r"\[19\]") as err:
        CityscapesSegmentation(tmp_path)[0]
    assert str(label_path) in str(err.value)
    assert "train ids" in str(err.value)


def test_missing_split_and_empty_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val") as err:
        CityscapesSegmentation(tmp_path, "val")
    assert "expected the official Cityscapes layout" in str(err.value)
    (tmp_path / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no \*_leftImg8bit\.png images"):
        CityscapesSegmentation(tmp_path, "val")
    with pytest.raises(ValueError, match="label_type"):
        CityscapesSegmentation(tmp_path, "val", label_type="colors")  # type: ignore[arg-type]


def test_generated_scenes_through_the_reader(tmp_path: Path) -> None:
    root = generate_street_scenes(tmp_path, cities=("aachen", "bremen"), per_city=2, size=(64, 128))
    ds = CityscapesSegmentation(root, "val")
    assert len(ds) == 4 and len(ds.files) == 4
    assert [p.parent.name for p, _ in ds.files] == ["aachen", "aachen", "bremen", "bremen"]
    image, mask = ds[3]
    raw = np.asarray(Image.open(ds.files[3][1]))
    np.testing.assert_array_equal(mask.numpy(), ID_TO_TRAINID[raw])
    assert image.shape == (3, 64, 128)


def test_collate_pads_mixed_sizes_with_ignore() -> None:
    a = (torch.ones(3, 2, 3), torch.zeros(2, 3, dtype=torch.long))
    b = (torch.ones(3, 4, 2), torch.ones(4, 2, dtype=torch.long))
    images, masks = collate_segmentation([a, b])
    assert images.shape == (2, 3, 4, 3) and masks.shape == (2, 4, 3)
    assert images[0, :, 2:].abs().sum() == 0 and (masks[0, 2:] == 255).all()
    assert (masks[1, :, 2] == 255).all() and (masks[1, :, :2] == 1).all()


def test_datamodule_loaders(tmp_path: Path) -> None:
    root = generate_street_scenes(tmp_path, cities=("aachen",), per_city=4, size=(64, 128))
    dm = CityscapesDataModule(
        root,
        crop_size=(48, 96),
        batch_size=2,
        num_workers=0,
        pin_memory=False,
        val_resize=(32, 64),
        predict_dir=root / "leftImg8bit" / "val",
    )
    assert dm.num_classes == 19 and len(dm.class_names) == 19
    dm.setup("fit")
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 48, 96) and masks.shape == (2, 48, 96)
    assert masks.dtype == torch.long and set(masks.unique().tolist()) <= {*range(19), 255}
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 32, 64) and masks.shape == (2, 32, 64)
    dm.setup("predict")
    images, metas = next(iter(dm.predict_dataloader()))
    assert images.shape == (2, 3, 32, 64)
    assert metas[0] == {
        "file_name": "aachen/aachen_000000_000019_leftImg8bit.png",
        "orig_size": (64, 128),
        "input_size": (32, 64),
    }
    with pytest.raises(ValueError, match="test_split"):
        dm.setup("test")
    with pytest.raises(ValueError, match="predict_dir"):
        CityscapesDataModule(root).setup("predict")
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train"):
        CityscapesDataModule(tmp_path / "nowhere").setup("fit")


def test_workers_get_different_augmentations(tmp_path: Path) -> None:
    # Albumentations' Compose owns its RNG; without reseeding, forked workers repeat each other.
    root = generate_street_scenes(
        tmp_path, cities=("aachen",), per_city=1, size=(64, 128), splits=("train",)
    )
    dm = CityscapesDataModule(
        root, crop_size=(32, 32), batch_size=1, num_workers=2, pin_memory=False, color_jitter=0.0
    )
    train = dm.train_dataset
    train.files, train.label_types = train.files * 2, train.label_types * 2  # one per worker
    loader = dm.train_dataloader()
    first, second = (batch[0] for batch in loader)
    assert not torch.equal(first, second)


def test_segmentation_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        SegmentationImageFolder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no image files"):
        SegmentationImageFolder(tmp_path)


def test_scan_counts_classes_and_finds_bad_files_up_front(tmp_path: Path) -> None:
    _write_pair(tmp_path, np.array([[7, 7, 26], [0, 23, 23]]))
    counts = CityscapesSegmentation(tmp_path).scan()
    assert counts.shape == (20,)
    assert counts[0] == 2 and counts[13] == 1 and counts[10] == 2 and counts[19] == 1
    assert counts.sum() == 6
    _write_pair(tmp_path, np.array([[7, 250]]), stem="aachen_000001_000019")
    with pytest.raises(CityscapesDataError, match=r"aachen_000001_000019_gtFine_labelIds\.png"):
        CityscapesSegmentation(tmp_path).scan()
    _write_pair(tmp_path, np.array([[7, 7]]), stem="aachen_000001_000019", image_size=(2, 2))
    with pytest.raises(CityscapesDataError, match="same size"):
        CityscapesSegmentation(tmp_path).scan()
