"""Generated Cityscapes-format street scenes: official layout, classes, void regions, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnv3det.data.cityscapes_labels import ID_TO_TRAINID
from mnv3det.data.synthetic_cityscapes import (
    SCENE_LABEL_IDS,
    VOID_LABEL_IDS,
    generate_street_scenes,
    render_street_scene,
)


def _label_files(root: Path, kind: str = "labelIds") -> list[Path]:
    return sorted((root / "gtFine").rglob(f"*_gtFine_{kind}.png"))


def test_official_layout_and_classes(tmp_path: Path) -> None:
    root = generate_street_scenes(
        tmp_path / "cs", cities=("aachen", "zurich"), per_city=3, size=(96, 192), seed=0
    )
    for split in ("train", "val"):
        for city in ("aachen", "zurich"):
            for i in range(3):
                stem = f"{city}_{i:06d}_000019"
                image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
                label = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
                assert image.is_file() and label.is_file()
                with Image.open(image) as im, Image.open(label) as lb:
                    assert im.mode == "RGB" and im.size == (192, 96)
                    assert lb.mode == "L" and lb.size == (192, 96)
    assert not _label_files(root, "labelTrainIds")
    values = np.concatenate([np.asarray(Image.open(p)).ravel() for p in _label_files(root)])
    present = set(np.unique(values).tolist())
    # Every evaluated class the generator draws appears, plus void (ignored) regions,
    # and nothing that is not a Cityscapes id.
    assert set(SCENE_LABEL_IDS) <= present
    assert present & set(VOID_LABEL_IDS)
    assert present <= set(SCENE_LABEL_IDS) | set(VOID_LABEL_IDS)
    assert (ID_TO_TRAINID[values] == 255).mean() > 0.005  # some pixels are ignored


def test_train_id_files_match_label_ids(tmp_path: Path) -> None:
    root = generate_street_scenes(
        tmp_path,
        cities=("bremen",),
        per_city=2,
        size=(64, 128),
        splits=("train",),
        write_train_ids=True,
    )
    ids = _label_files(root)
    train_ids = _label_files(root, "labelTrainIds")
    assert len(ids) == len(train_ids) == 2
    for a, b in zip(ids, train_ids):
        np.testing.assert_array_equal(
            ID_TO_TRAINID[np.asarray(Image.open(a))], np.asarray(Image.open(b))
        )


def test_deterministic_and_splits_differ(tmp_path: Path) -> None:
    a = generate_street_scenes(
        tmp_path / "a", cities=("aachen",), per_city=2, size=(64, 128), seed=3
    )
    b = generate_street_scenes(
        tmp_path / "b", cities=("aachen",), per_city=2, size=(64, 128), seed=3
    )
    c = generate_street_scenes(
        tmp_path / "c", cities=("aachen",), per_city=2, size=(64, 128), seed=4
    )
    rel = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    img_a, img_b, img_c = (np.asarray(Image.open(r / rel)) for r in (a, b, c))
    np.testing.assert_array_equal(img_a, img_b)
    assert not np.array_equal(img_a, img_c)
    val = np.asarray(Image.open(a / rel.replace("train", "val")))
    assert not np.array_equal(img_a, val)


def test_scene_is_not_trivial() -> None:
    image, label = render_street_scene(np.random.default_rng(0), (128, 256))
    assert image.shape == (128, 256, 3) and label.shape == (128, 256)
    road = image[label == 7].astype(np.float32)
    assert road.std(axis=0).mean() > 3  # textured / noisy, not a flat colour
    assert len(np.unique(label)) >= 6


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="per_city"):
        generate_street_scenes("/nonexistent", per_city=0)
    with pytest.raises(ValueError, match="city name"):
        generate_street_scenes("/nonexistent", cities=("new_york",))
    with pytest.raises(ValueError, match="too small"):
        render_street_scene(np.random.default_rng(0), (8, 8))
