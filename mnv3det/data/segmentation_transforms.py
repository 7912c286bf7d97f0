"""Albumentations pipelines for semantic segmentation (LR-ASPP on Cityscapes, paper §6.4).

Training follows the published Cityscapes recipes (torchvision's segmentation references,
mmsegmentation's LR-ASPP config): random rescale by 0.5-2.0, a random crop
(512x1024 by default), padded where the scaled image is smaller than the crop with 0 for the
image and the ignore index 255 for the mask (the padding is not trained on), horizontal flip and
photometric jitter. Masks are always resized with nearest-neighbour interpolation, so every mask
value stays a valid train id. Validation runs on the full image (optionally resized for demos).

Pipelines take and return numpy arrays (``image`` HWC uint8 RGB, ``mask`` HW uint8 train ids);
:class:`mnv3det.data.cityscapes.CityscapesSegmentation` converts to tensors afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2

from mnv3det.data.cityscapes_labels import IGNORE_INDEX


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    if len(value) != 2 or any(int(v) < 1 for v in value):
        raise ValueError(f"{name} must be (height, width) with positive sizes, got {value!r}")
    return int(value[0]), int(value[1])


def train_transforms(
    crop_size: int | Sequence[int] = (512, 1024),
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip_p: float = 0.5,
    color_jitter: float = 0.3,
    jitter_p: float = 0.8,
    seed: int | None = None,
) -> A.Compose:
    """Training pipeline: random scale, pad with ignore, random crop, flip, colour jitter.

    Args:
        crop_size: ``(height, width)`` of the training crop (an int for a square crop).
        scale_range: ``(min, max)`` rescale factor applied to the whole image before cropping.
        hflip_p: probability of a horizontal flip.
        color_jitter: brightness/contrast/saturation jitter strength (hue gets a fifth of it);
            0 disables photometric jitter.
        jitter_p: probability of applying the colour jitter.
        seed: albumentations random seed (``None``: reseeded per DataLoader worker by
            :func:`mnv3det.data.seeding.seed_worker_transforms`).

    Returns:
        An ``A.Compose`` called as ``pipeline(image=..., mask=...)``.

    Raises:
        ValueError: bad crop size or scale range.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {scale_range!r}")
    lo, hi = float(scale_range[0]), float(scale_range[1])
    steps: list[A.BasicTransform] = []
    if (lo, hi) != (1.0, 1.0):
        # RandomScale samples the factor as 1 + U(scale_limit), so (lo - 1, hi - 1) gives U(lo, hi).
        steps.append(
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        )
    steps += [
        # Pad at the bottom/right as torchvision's references and mmsegmentation do; the mask
        # padding is the ignore index, so padded pixels never contribute to the loss.
        A.PadIfNeeded(
            min_height=crop_h,
            min_width=crop_w,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        ),
        A.RandomCrop(height=crop_h, width=crop_w),
        A.HorizontalFlip(p=hflip_p),
    ]
    if color_jitter > 0:
        steps.append(
            A.ColorJitter(
                brightness=color_jitter,
                contrast=color_jitter,
                saturation=color_jitter,
                hue=min(0.5, color_jitter / 5),
                p=jitter_p,
            )
        )
    return A.Compose(steps, seed=seed)


def eval_transforms(resize: int | Sequence[int] | None = None) -> A.Compose:
    """Evaluation pipeline: the full image, optionally resized (for demos and quick checks).

    The benchmark evaluates at full resolution (``resize=None``). With ``resize`` the image is
    resized bilinearly and the mask with nearest neighbour, so the mIoU is then measured at the
    reduced size.

    Args:
        resize: ``(height, width)`` to resize to, or ``None`` for the original size.
    """
    steps: list[A.BasicTransform] = []
    if resize is not None:
        h, w = _pair(resize, "resize")
        steps.append(
            A.Resize(
                height=h,
                width=w,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
            )
        )
    return A.Compose(steps)
