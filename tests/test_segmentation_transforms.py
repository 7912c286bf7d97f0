"""Segmentation pipelines keep image and mask aligned, pad masks with 255, and never blend labels."""

from __future__ import annotations

import numpy as np
import pytest

from mnv3det.data.segmentation_transforms import eval_transforms, train_transforms


def _coded_pair(h: int = 60, w: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """An image whose colour encodes the mask: label = 10 * (row band) + (column band).

    Blocks are large enough that bilinear image resizing keeps their interior colour exact.
    """
    rows = (np.arange(h) * 3 // h)[:, None]
    cols = (np.arange(w) * 3 // w)[None, :]
    mask = (rows * 3 + cols).astype(np.uint8)  # 0..8, 9 regions
    lut = np.array([[i * 28, 255 - i * 28, (i * 97) % 256] for i in range(9)], dtype=np.uint8)
    return lut[mask], mask


def _lut() -> np.ndarray:
    return np.array([[i * 28, 255 - i * 28, (i * 97) % 256] for i in range(9)], dtype=np.int32)


@pytest.mark.parametrize("seed", range(12))
def test_train_pipeline_keeps_alignment_and_pads_with_ignore(seed: int) -> None:
    image, mask = _coded_pair()
    pipeline = train_transforms(
        crop_size=(80, 120), scale_range=(0.5, 2.0), color_jitter=0.0, seed=seed
    )
    out = pipeline(image=image, mask=mask)
    img, msk = out["image"], out["mask"]
    assert img.shape == (80, 120, 3) and msk.shape == (80, 120)
    assert img.dtype == np.uint8 and msk.dtype == np.uint8
    # Nearest interpolation: only original values or the ignore index.
    assert set(np.unique(msk).tolist()) <= {*range(9), 255}
    # Padding: image 0 exactly where the mask is 255.
    pad = msk == 255
    assert (img[pad] == 0).all()
    # Alignment: away from region borders (where bilinear blending is allowed) every labelled
    # pixel has its region's colour.
    valid = ~pad
    err = np.abs(img.astype(np.int32) - _lut()[np.where(valid, msk, 0)]).max(axis=-1)
    # Erode: check only pixels whose 5x5 neighbourhood has a single label (bilinear upscaling
    # by up to 2x blends colours over about two pixels at a region border).
    padded = np.pad(msk.astype(np.int32), 2, mode="edge")
    same = np.ones_like(valid)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            same &= padded[2 + dy : 2 + dy + msk.shape[0], 2 + dx : 2 + dx + msk.shape[1]] == msk
    interior = valid & same
    assert interior.sum() > 100
    assert err[interior].max() <= 2


def test_small_image_is_padded_bottom_right_with_255() -> None:
    image, mask = _coded_pair(20, 30)
    pipeline = train_transforms(
        crop_size=(40, 50), scale_range=(1.0, 1.0), hflip_p=0.0, color_jitter=0.0, seed=0
    )
    out = pipeline(image=image, mask=mask)
    np.testing.assert_array_equal(out["mask"][:20, :30], mask)
    np.testing.assert_array_equal(out["image"][:20, :30], image)
    assert (out["mask"][20:] == 255).all() and (out["mask"][:, 30:] == 255).all()
    assert (out["image"][20:] == 0).all() and (out["image"][:, 30:] == 0).all()


def test_flip_and_jitter_change_image_but_mask_stays_consistent() -> None:
    image, mask = _coded_pair()
    pipeline = train_transforms(
        crop_size=(60, 90), scale_range=(1.0, 1.0), hflip_p=1.0, color_jitter=0.0, seed=0
    )
    out = pipeline(image=image, mask=mask)
    np.testing.assert_array_equal(out["mask"], mask[:, ::-1])
    np.testing.assert_array_equal(out["image"], image[:, ::-1])
    jitter = train_transforms(
        crop_size=(60, 90), scale_range=(1.0, 1.0), hflip_p=0.0, jitter_p=1.0, seed=1
    )
    out = jitter(image=image, mask=mask)
    np.testing.assert_array_equal(out["mask"], mask)  # photometric only
    assert not np.array_equal(out["image"], image)


def test_scale_range_is_respected() -> None:
    image, mask = _coded_pair(40, 80)
    sizes = set()
    for seed in range(20):
        # A crop larger than any scaled image: the unpadded extent is the scaled size.
        out = train_transforms((200, 400), (0.5, 2.0), hflip_p=0.0, color_jitter=0.0, seed=seed)(
            image=image, mask=mask
        )
        h = int((out["mask"][:, 0] != 255).sum())
        sizes.add(h)
        assert 20 <= h <= 80
    assert len(sizes) > 5


def test_eval_transforms_full_size_and_resize() -> None:
    image, mask = _coded_pair()
    out = eval_transforms()(image=image, mask=mask)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["mask"], mask)
    out = eval_transforms((30, 45))(image=image, mask=mask)
    assert out["image"].shape == (30, 45, 3)
    np.testing.assert_array_equal(out["mask"], mask[::2, ::2])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        train_transforms(crop_size=(0, 10))
    with pytest.raises(ValueError, match="scale_range"):
        train_transforms(scale_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="resize"):
        eval_transforms((10,))
