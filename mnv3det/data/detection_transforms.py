"""The SSD augmentation recipe as albumentations 2.0 pipelines (SSDLite training, paper §6.3).

SSD (Liu et al. 2016, §2.2 "Data augmentation", and its "zoom out" extension in §3.6) trains with:
photometric distortion -> zoom-out ("expand") -> IoU-constrained random crop -> resize ->
horizontal flip. torchvision's SSDLite recipe uses the crop and the flip; its SSD recipe and
mmdetection's SSDLite add the photometric distortion and the zoom-out.

What albumentations 2.0.8 has and what is written here:

* photometric distortion: ``A.ColorJitter`` applies brightness, contrast, saturation and hue in a
  random order, which is SSD's distortion (SSD randomises contrast before/after the HSV part);
  ranges are torchvision's ``RandomPhotometricDistort`` ones. SSD's random channel swap is
  ``A.ChannelShuffle`` (off by default: it changes colour semantics).
* zoom-out: albumentations has no equivalent (``A.Affine(scale<1)`` shrinks the image inside a
  canvas of the *same* size, losing resolution before the crop; ``A.CropAndPad`` samples each side
  independently and changes the aspect ratio), so :class:`ZoomOut` is written here: a canvas of
  ``r`` times the image size, ``r ~ U(1, max_scale)``, filled with the mean colour, the image pasted
  at a random position.
* IoU-constrained crop: albumentations' bbox-safe crops keep all (``BBoxSafeRandomCrop``) or at
  least one (``AtLeastOneBBoxRandomCrop``) box, but none samples SSD's minimum-IoU constraint, so
  :class:`MinIoURandomCrop` is written here (torchvision's ``RandomIoUCrop`` semantics).
* flip and resize: ``A.HorizontalFlip``, ``A.Resize``.

Boxes are pascal_voc (xyxy pixels) with ``label_fields=["labels"]``; albumentations carries the
labels as extra columns of the box array, so a transform that drops a box drops its label too.
Call a pipeline as ``pipeline(image=uint8 HWC, bboxes=(N, 4), labels=(N,))``.

Randomness: ``A.Compose`` keeps its own generator (global seeds do not reach it). Pipelines take a
``seed``; in DataLoader workers use :func:`mnv3det.data.seeding.seed_worker_transforms` as ``worker_init_fn`` so each
worker (and each epoch) gets its own stream derived from torch's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops import functional as fcrops
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.augmentations.geometric import functional as fgeometric
from albumentations.core.bbox_utils import denormalize_bboxes
from albumentations.core.transforms_interface import BaseTransformInitSchema, DualTransform
from albumentations.core.type_definitions import Targets
from pydantic import Field, model_validator

__all__ = [
    "IMAGENET_MEAN_RGB",
    "MinIoURandomCrop",
    "ZoomOut",
    "bbox_params",
    "eval_transforms",
    "train_transforms",
]

#: ImageNet mean colour in 0-255, SSD's fill for zoom-out canvases.
IMAGENET_MEAN_RGB: tuple[int, int, int] = (124, 116, 104)


def bbox_params(min_size: float = 1.0) -> A.BboxParams:
    """The box settings of every pipeline here: pascal_voc boxes, ``labels`` as the label field,
    boxes clipped to the image and dropped when narrower/lower than ``min_size`` pixels of the
    pipeline's *output*.

    The size filter runs once, after the last transform (``check_each_transform=False``), not
    after each one: a box is judged at the size the model sees (a 0.8-pixel box in a crop that
    the resize scales up 2x is kept), and each image saves the per-transform filtering passes
    (about 10 % of a training item's CPU time, measured with ``tools/input_pipeline_benchmark.py``).
    Clipping needs no intermediate pass: :class:`MinIoURandomCrop` clips to its crop itself and
    the other transforms keep boxes inside the image.
    """
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        min_width=min_size,
        min_height=min_size,
        clip=True,
        filter_invalid_bboxes=True,
        check_each_transform=False,
    )


class ZoomOut(DualTransform):
    """SSD's zoom-out ("expand"): paste the image at a random place on a larger canvas.

    The canvas is ``r * H`` by ``r * W`` with ``r ~ U(1, max_scale)`` (the aspect ratio is kept),
    filled with ``fill``; boxes (and their labels), masks and keypoints move with the image.
    Written here because albumentations 2.0 has no transform that enlarges the canvas at a fixed
    aspect ratio (see the module docstring).

    Args:
        max_scale: largest canvas / image side ratio (SSD: 4; >= 1).
        fill: canvas colour for the image (SSD: the mean pixel).
        fill_mask: canvas value for masks.
        p: probability of applying (SSD: 0.5).
    """

    _targets = (Targets.IMAGE, Targets.MASK, Targets.BBOXES, Targets.KEYPOINTS)

    class InitSchema(BaseTransformInitSchema):
        max_scale: float = Field(ge=1.0)
        fill: tuple[float, ...] | float
        fill_mask: tuple[float, ...] | float

    def __init__(
        self,
        max_scale: float = 4.0,
        fill: tuple[float, ...] | float = IMAGENET_MEAN_RGB,
        fill_mask: tuple[float, ...] | float = 0,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.max_scale = max_scale
        self.fill = fill
        self.fill_mask = fill_mask

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, int]:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_scale)
        new_height, new_width = round(height * ratio), round(width * ratio)
        top = self.py_random.randint(0, new_height - height)
        left = self.py_random.randint(0, new_width - width)
        return {
            "pad_top": top,
            "pad_bottom": new_height - height - top,
            "pad_left": left,
            "pad_right": new_width - width - left,
        }

    def apply(
        self,
        img: np.ndarray,
        pad_top: int,
        pad_bottom: int,
        pad_left: int,
        pad_right: int,
        **params: Any,
    ) -> np.ndarray:
        return fgeometric.pad_with_params(
            img, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_CONSTANT, self.fill
        )

    def apply_to_mask(
        self,
        mask: np.ndarray,
        pad_top: int,
        pad_bottom: int,
        pad_left: int,
        pad_right: int,
        **params: Any,
    ) -> np.ndarray:
        return fgeometric.pad_with_params(
            mask, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_CONSTANT, self.fill_mask
        )

    def apply_to_bboxes(
        self,
        bboxes: np.ndarray,
        pad_top: int,
        pad_bottom: int,
        pad_left: int,
        pad_right: int,
        **params: Any,
    ) -> np.ndarray:
        # Boxes arrive normalised to the input size and must leave normalised to the canvas.
        height, width = params["shape"][:2]
        new_height = height + pad_top + pad_bottom
        new_width = width + pad_left + pad_right
        out = bboxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * width + pad_left) / new_width
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * height + pad_top) / new_height
        return out

    def apply_to_keypoints(
        self,
        keypoints: np.ndarray,
        pad_top: int,
        pad_bottom: int,
        pad_left: int,
        pad_right: int,
        **params: Any,
    ) -> np.ndarray:
        out = keypoints.copy()
        out[:, 0] += pad_left
        out[:, 1] += pad_top
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_scale", "fill", "fill_mask")


class MinIoURandomCrop(BaseCrop):
    """SSD's IoU-constrained random crop ("sample a patch so that the minimum jaccard overlap with
    the objects is 0.1, 0.3, 0.5, 0.7 or 0.9", SSD §2.2), with torchvision's ``RandomIoUCrop``
    semantics:

    1. pick ``min_iou`` from ``min_ious`` (``1.0`` or more: keep the whole image);
    2. up to ``trials`` times, sample a crop with sides ``U(min_scale, max_scale)`` of the image's and
       aspect ratio (w/h) in ``[min_aspect, max_aspect]``; accept it if at least one box centre lies
       inside it and the best IoU between those boxes and the crop is >= ``min_iou``;
    3. otherwise pick another ``min_iou`` (at most ``max_attempts`` times, then keep the whole image,
       where torchvision would loop on).

    Boxes whose centre falls outside the crop are dropped (with their labels), as SSD does; the
    others are clipped to the crop. Images without boxes are left whole.

    Args:
        min_ious: the minimum-IoU choices (SSD: 0.1 .. 0.9, plus "any crop" = 0.0 and "whole" = 1.0).
        min_scale, max_scale: crop side as a fraction of the image side.
        min_aspect, max_aspect: crop aspect ratio (w/h) limits, in pixels.
        trials: crop samples per ``min_iou`` choice.
        max_attempts: ``min_iou`` choices before giving up and keeping the whole image.
        p: probability of applying.
    """

    class InitSchema(BaseTransformInitSchema):
        min_ious: Sequence[float]
        min_scale: float = Field(gt=0.0, le=1.0)
        max_scale: float = Field(gt=0.0, le=1.0)
        min_aspect: float = Field(gt=0.0)
        max_aspect: float = Field(gt=0.0)
        trials: int = Field(ge=1)
        max_attempts: int = Field(ge=1)

        @model_validator(mode="after")
        def _check(self) -> MinIoURandomCrop.InitSchema:
            if self.min_scale > self.max_scale or self.min_aspect > self.max_aspect:
                raise ValueError("need min_scale <= max_scale and min_aspect <= max_aspect")
            if not self.min_ious:
                raise ValueError("min_ious must not be empty")
            return self

    def __init__(
        self,
        min_ious: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect: float = 0.5,
        max_aspect: float = 2.0,
        trials: int = 40,
        max_attempts: int = 50,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.min_ious = tuple(float(v) for v in min_ious)
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.min_aspect = min_aspect
        self.max_aspect = max_aspect
        self.trials = trials
        self.max_attempts = max_attempts

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        whole = (0, 0, width, height)
        bboxes = data.get("bboxes")
        if bboxes is None or len(bboxes) == 0:
            return {"crop_coords": whole, "min_iou": None}
        boxes = denormalize_bboxes(np.asarray(bboxes, dtype=np.float32)[:, :4], (height, width))
        centres_x = (boxes[:, 0] + boxes[:, 2]) / 2
        centres_y = (boxes[:, 1] + boxes[:, 3]) / 2
        rng = self.py_random
        for _ in range(self.max_attempts):
            min_iou = self.min_ious[rng.randrange(len(self.min_ious))]
            if min_iou >= 1.0:
                return {"crop_coords": whole, "min_iou": min_iou}
            for _ in range(self.trials):
                new_w = int(width * rng.uniform(self.min_scale, self.max_scale))
                new_h = int(height * rng.uniform(self.min_scale, self.max_scale))
                if new_w < 1 or new_h < 1:
                    continue
                if not self.min_aspect <= new_w / new_h <= self.max_aspect:
                    continue
                left = int((width - new_w) * rng.random())
                top = int((height - new_h) * rng.random())
                right, bottom = left + new_w, top + new_h
                inside = (
                    (left < centres_x)
                    & (centres_x < right)
                    & (top < centres_y)
                    & (centres_y < bottom)
                )
                if not inside.any():
                    continue
                ious = _iou_with_crop(boxes[inside], (left, top, right, bottom))
                if ious.max() < min_iou:
                    continue
                return {"crop_coords": (left, top, right, bottom), "min_iou": min_iou}
        return {"crop_coords": whole, "min_iou": None}

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        if not len(bboxes):
            return bboxes
        shape = params["shape"][:2]
        pixels = denormalize_bboxes(bboxes.astype(np.float32, copy=True), shape)
        left, top, right, bottom = crop_coords
        cx = (pixels[:, 0] + pixels[:, 2]) / 2
        cy = (pixels[:, 1] + pixels[:, 3]) / 2
        # SSD keeps a box only if its centre is inside the crop (the label column goes with it).
        keep = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
        bboxes = bboxes[keep]
        cropped = fcrops.crop_bboxes_by_coords(bboxes, crop_coords, shape)
        # crop_bboxes_by_coords shifts but does not clip: clip to the crop here.
        cropped[:, :4] = np.clip(cropped[:, :4], 0.0, 1.0)
        return cropped

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return (
            "min_ious",
            "min_scale",
            "max_scale",
            "min_aspect",
            "max_aspect",
            "trials",
            "max_attempts",
        )


def _iou_with_crop(boxes: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """IoU of each xyxy box with one xyxy crop rectangle (torchvision.ops.box_iou on numpy)."""
    left, top, right, bottom = crop
    iw = np.clip(np.minimum(boxes[:, 2], right) - np.maximum(boxes[:, 0], left), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], bottom) - np.maximum(boxes[:, 1], top), 0, None)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + (right - left) * (bottom - top) - inter
    return inter / np.maximum(union, 1e-9)


def train_transforms(
    size: int | tuple[int, int] = 320,
    *,
    photometric: bool = True,
    photometric_p: float = 0.5,
    channel_shuffle_p: float = 0.0,
    zoom_out: bool = True,
    zoom_out_max_scale: float = 4.0,
    zoom_out_p: float = 0.5,
    iou_crop: bool = True,
    min_ious: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
    hflip_p: float = 0.5,
    fill: tuple[int, int, int] = IMAGENET_MEAN_RGB,
    min_box_size: float = 1.0,
    seed: int | None = None,
) -> A.Compose:
    """SSD's training pipeline: photometric distortion, zoom-out, min-IoU crop, flip, resize.

    Args:
        size: output side (``int``) or ``(H, W)``; the model input size (torchvision: 320).
        photometric: use the photometric distortion (``A.ColorJitter``, random order).
        photometric_p: its probability (SSD / torchvision: 0.5).
        channel_shuffle_p: probability of SSD's random channel swap (default off).
        zoom_out: use :class:`ZoomOut`.
        zoom_out_max_scale: its largest canvas ratio (SSD: 4; smaller data sets of small images
            may prefer 2).
        zoom_out_p: its probability (SSD: 0.5).
        iou_crop: use :class:`MinIoURandomCrop`.
        min_ious: its minimum-IoU choices.
        hflip_p: horizontal flip probability.
        fill: zoom-out canvas colour.
        min_box_size: boxes smaller than this (pixels, in the output) are dropped.
        seed: seed of the pipeline's own generator (``None``: from the OS).

    Returns:
        an ``A.Compose`` taking ``image=``, ``bboxes=`` (pascal_voc), ``labels=``.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    steps: list[A.BasicTransform] = []
    if photometric:
        # torchvision RandomPhotometricDistort ranges; ColorJitter shuffles the order.
        steps.append(
            A.ColorJitter(
                brightness=(0.875, 1.125),
                contrast=(0.5, 1.5),
                saturation=(0.5, 1.5),
                hue=(-0.05, 0.05),
                p=photometric_p,
            )
        )
    if channel_shuffle_p > 0:
        steps.append(A.ChannelShuffle(p=channel_shuffle_p))
    if zoom_out:
        steps.append(ZoomOut(max_scale=zoom_out_max_scale, fill=fill, p=zoom_out_p))
    if iou_crop:
        steps.append(MinIoURandomCrop(min_ious=min_ious))
    if hflip_p > 0:
        steps.append(A.HorizontalFlip(p=hflip_p))
    steps.append(A.Resize(height, width, interpolation=cv2.INTER_LINEAR))
    return A.Compose(steps, bbox_params=bbox_params(min_box_size), seed=seed)


def eval_transforms(min_box_size: float = 1.0) -> A.Compose:
    """Evaluation pipeline: nothing changes the image (the model resizes internally and maps its
    boxes back to the original pixels); boxes are only clipped / filtered like in training."""
    return A.Compose([A.NoOp()], bbox_params=bbox_params(min_box_size))
