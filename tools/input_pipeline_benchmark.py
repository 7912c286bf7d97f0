"""SSDLite training input pipeline throughput: ours next to torchvision's reference recipe.

Measures images per second through the *training DataLoader* (JPEG decode, augmentation, resize
where the pipeline has one, collation into a batch; for ours also the uint8 -> [0, 1] scaling
that ``CocoDataModule.on_after_batch_transfer`` does once the batch is on the training device),
nothing else: no model, no device copy.

Pipelines (same images, batch size, workers, ``pin_memory=False``, ``persistent_workers=False``):

* ``ours (ssdlite)`` / ``ours (ssd)``: :class:`mnv3det.tasks.detection_data.CocoDataModule`
  (``size=320``) with the augmentation our COCO configs train with (``photometric: false``,
  ``zoom_out_max_scale: 1.0``: min-IoU crop and horizontal flip, as torchvision's SSDLite
  recipe) or the data module's defaults (the full SSD augmentation: photometric distortion
  p=0.5, zoom-out p=0.5 up to 4x, min-IoU crop, flip), both resizing to 320x320 in the loader;
  ``setup("fit")``; the loader is the one
  ``train_dataloader()`` builds (:meth:`~mnv3det.data.sampling.ResumableTrainData.make_train_loader`
  with its ``collate_fn``, ``pin_memory`` and ``drop_last``), with ``persistent_workers=False``.
* ``torchvision reference``: what ``references/detection/train.py --data-augmentation ssdlite
  --use-v2`` (the SSDLite recipe, default ``--backend pil``) builds:
  ``torchvision.datasets.CocoDetection`` wrapped by ``wrap_dataset_for_transforms_v2(ds,
  target_keys=("boxes", "labels", "image_id"))``, the v2 transforms of the reference's
  ``DetectionPresetTrain`` (preset ``ssdlite``: ``RandomIoUCrop``, ``RandomHorizontalFlip(0.5)``;
  preset ``ssd`` adds ``RandomPhotometricDistort()`` and ``RandomZoomOut(fill=mean)`` first, the
  full SSD augmentation as ours), then ``ToImage``, ``ToDtype(float, scale=True)``,
  ``ConvertBoundingBoxFormat(XYXY)``, ``SanitizeBoundingBoxes``, ``ToPureTensor``; a random
  sampler in batches of ``B`` and the collate ``tuple(zip(*batch))``. Written here from the
  reference (which is not installed with torchvision), not imported. The recipe groups batches
  by aspect ratio (``--aspect-ratio-group-factor 3``, the reference's ``GroupedBatchSampler``):
  that changes which images share a batch, not the work per image, and is left out here.

* ``torchvision reference (ssdlite, v1 default)``: the same recipe *without* ``--use-v2``,
  ``train.py``'s default: the reference's ``ConvertCocoPolysToMask`` decodes a full-size mask
  per object from its polygons (pycocotools) for every image, then its own v1 ``RandomIoUCrop``
  / ``RandomHorizontalFlip`` / ``PILToTensor`` / ``ToDtype`` (:class:`ReferenceV1Transforms`,
  written after the reference's algorithm); the masks travel through the loader too.

The reference yields images at their own (variable) size: the model resizes them
(``GeneralizedRCNNTransform``, on the training device), whereas ours resizes to 320x320 in the
loader. The ``+ resize 320 in loader`` rows add that resize to the reference's loader
(``torch.nn.functional.interpolate`` bilinear to 320x320, as ``GeneralizedRCNNTransform`` does for
SSDLite's fixed size, boxes scaled alike), so that both loaders do the same work.

Timing: each pass builds a fresh loader, takes ``--warmup`` batches untimed (default 1: worker
start-up and the first batch) and times the rest of the epoch; images/s = timed images / seconds.
While the first batch is awaited, the other workers prepare theirs, so with ``W`` workers about
``W - 1`` batches of the timed images are partly made before the clock starts: rates are high by
up to ``(N - B) / (N - W * B)`` (~11 % at the defaults), alike for every pipeline, so the ratios
hold; ``--warmup W`` (or more images) removes most of it. The pipelines run in ``--rounds``
interleaved rounds (order rotated every round) so that a machine shared with other work slows
them alike; the table gives the median and interquartile range over the rounds and the ratio to
the torchvision reference row of the same preset and workers. Every pass is
seeded (``--seed``), so the images, order and augmentations repeat. With ``--workers 0`` the
transforms run in the main process on torch's threads (``--threads``); workers use one each.

Data: ``--images`` COCO-like JPEGs written to a temporary folder (COCO sizes 640x480, 480x640,
640x427, 500x375, 375x500, 612x612; quality 90; gradients, blotches, noise and 1-8 filled
rectangles / ellipses per image, with boxes over the 80 COCO category ids), or the first
``--images`` annotated images of a real COCO split with ``--root``. Usage::

    python tools/input_pipeline_benchmark.py --images 256 --batch-size 24 --workers 2 --rounds 3
    python tools/input_pipeline_benchmark.py --workers 0 2 --root /data/coco   # real COCO
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from mnv3det.help_format import DefaultsHelpFormatter

#: (width, height) of the generated images: the most common COCO shapes.
COCO_SIZES: tuple[tuple[int, int], ...] = (
    (640, 480),
    (480, 640),
    (640, 427),
    (500, 375),
    (375, 500),
    (612, 612),
)
#: torchvision's reference mean pixel (RandomZoomOut fill of its "ssd" preset).
REFERENCE_MEAN: tuple[float, float, float] = (123.0, 117.0, 104.0)


# ------------------------------------------------------------------------------------ data
def coco_categories() -> list[dict[str, Any]]:
    """The 80 COCO categories (ids 1..90 with gaps), named as torchvision's COCO weights."""
    from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights

    names = SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"]
    return [
        {"id": i, "name": name, "supercategory": "thing"}
        for i, name in enumerate(names)
        if name not in ("N/A", "__background__")
    ]


def draw_coco_like_image(
    rng: np.random.Generator, width: int, height: int, category_ids: Sequence[int]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One ``(H, W, 3)`` uint8 image and its 1-8 annotations (no ids yet).

    Content: a linear colour gradient, low-frequency blotches, filled rectangles / ellipses (the
    objects, occluding each other in drawing order), then a fine random texture and pixel noise
    over everything, so that a quality-90 JPEG of 640x480 weighs about as much as a COCO one
    (here 80-190 kB, mean ~130 kB; COCO train2017: ~160 kB).
    """
    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    c0, c1, c2 = rng.uniform(30, 225, size=(3, 3)).astype(np.float32)
    image = c0 + (c1 - c0) * xx + (c2 - c0) * yy
    coarse = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3))
    blotches = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    image += 0.35 * (np.asarray(blotches, dtype=np.float32) - 128.0)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    side = min(width, height)
    annotations: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, 9))):
        w = min(side * rng.uniform(0.06, 0.6) * math.sqrt(rng.uniform(0.5, 2.0)), width - 2.0)
        h = min(w * rng.uniform(0.5, 2.0), height - 2.0)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        ellipse = bool(rng.random() < 0.5)
        shape = (x0, y0, x0 + w, y0 + h)
        if ellipse:
            draw.ellipse(shape, fill=fill)
        else:
            draw.rectangle(shape, fill=fill)
        x0, y0, w, h = (round(float(v), 2) for v in (x0, y0, w, h))
        annotations.append(
            {
                "category_id": int(category_ids[int(rng.integers(len(category_ids)))]),
                "bbox": [x0, y0, w, h],
                "area": round(math.pi / 4 * w * h if ellipse else w * h, 2),
                "iscrowd": 0,
                "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]],
            }
        )
    # Fine texture (a random grid at a third of the resolution, upsampled) and pixel noise.
    fine = rng.integers(0, 256, size=(height // 3, width // 3, 3)).astype(np.uint8)
    texture = np.asarray(Image.fromarray(fine).resize((width, height), Image.BICUBIC))
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.uniform(0.35, 0.6) * (texture.astype(np.float32) - 128.0)
    pixels += rng.normal(0.0, rng.uniform(5.0, 9.0), size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), annotations


def write_synthetic_coco(
    root: str | Path, num_images: int, seed: int = 0, split: str = "train2017"
) -> Path:
    """Write ``num_images`` COCO-like JPEGs (quality 90) in the official COCO layout.

    ``root/{split}/000000000001.jpg ...`` and ``root/annotations/instances_{split}.json`` with
    ``images``, ``annotations`` (``bbox`` xywh, ``area``, ``iscrowd`` 0, a box polygon as
    ``segmentation``) and the 80 COCO ``categories``. Image ``i`` is drawn from its own generator
    seeded with ``(seed, i)``, its size from :data:`COCO_SIZES`. Returns ``Path(root)``.
    """
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = coco_categories()
    category_ids = [c["id"] for c in categories]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        width, height = COCO_SIZES[int(rng.integers(len(COCO_SIZES)))]
        pixels, anns = draw_coco_like_image(rng, width, height, category_ids)
        image_id = i + 1
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(root / split / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    document = {
        "info": {"description": "tools/input_pipeline_benchmark.py synthetic COCO", "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return root


def coco_subset(source: str | Path, dest: str | Path, num_images: int, split: str) -> Path:
    """A COCO root at ``dest`` holding the first ``num_images`` images (by id) of ``source``'s
    ``split`` that have a box wider and taller than 1 pixel (the reference's training filter,
    ``_coco_remove_images_without_annotations``); ``dest/{split}`` links to the real folder."""
    source, dest = Path(source), Path(dest)
    with open(source / "annotations" / f"instances_{split}.json") as f:
        data = json.load(f)
    valid = {a["image_id"] for a in data["annotations"] if min(a["bbox"][2:4]) > 1}
    images = sorted((im for im in data["images"] if im["id"] in valid), key=lambda im: im["id"])
    images = images[:num_images]
    if len(images) < num_images:
        raise ValueError(f"{source} has only {len(images)} annotated images in {split}")
    keep = {im["id"] for im in images}
    subset = {
        "info": data.get("info", {}),
        "licenses": data.get("licenses", []),
        "images": images,
        "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
        "categories": data["categories"],
    }
    (dest / "annotations").mkdir(parents=True, exist_ok=True)
    (dest / "annotations" / f"instances_{split}.json").write_text(json.dumps(subset))
    (dest / split).symlink_to((source / split).resolve(), target_is_directory=True)
    return dest


# ------------------------------------------------------------------------------- pipelines
@dataclass
class Pipeline:
    """One configuration to time: ``make_loader()`` builds a fresh, seeded loader per pass."""

    name: str
    augmentation: str
    workers: int
    batch: int
    make_loader: Callable[[], Iterable[Any]]
    #: what the training step does to a batch before the model sees it (ours: uint8 -> [0, 1])
    finish: Callable[[Any], Any] = lambda batch: batch
    images_per_s: list[float] = field(default_factory=list)
    images_per_pass: list[int] = field(default_factory=list)


#: Our data module's augmentation settings per preset: ``ssdlite`` is what our COCO configs
#: train with (as torchvision's SSDLite recipe), ``ssd`` the data module's defaults.
OUR_PRESETS = {
    "ssdlite": {"photometric": False, "zoom_out_max_scale": 1.0},
    "ssd": {"photometric": True, "zoom_out_max_scale": 4.0},
}


def our_pipeline(
    root: Path, split: str, preset: str, size: int, batch: int, workers: int, seed: int
) -> Pipeline:
    """``CocoDataModule(root, size, batch, workers, seed)``'s training loader with the
    augmentation of ``preset`` (:data:`OUR_PRESETS`)."""
    from mnv3det.tasks.detection_data import CocoDataModule

    data = CocoDataModule(
        root,
        size=size,
        batch_size=batch,
        num_workers=workers,
        train_split=split,
        val_split=split,  # setup("fit") also indexes a validation split; none is read here
        pin_memory=False,
        seed=seed,
        **OUR_PRESETS[preset],
    )
    data.setup("fit")
    # train_dataloader()'s settings, rebuilt per pass with persistent_workers=False (it keeps
    # workers alive between epochs; here every pass starts its workers, as the reference's).
    template = data.train_dataloader()
    settings = {
        "num_workers": template.num_workers,
        "collate_fn": template.collate_fn,
        "pin_memory": template.pin_memory,
    }  # drop_last: make_train_loader decides it as train_dataloader() does
    del template

    def make_loader() -> DataLoader:
        return data.make_train_loader(
            data.train_dataset, batch, persistent_workers=False, **settings
        )

    if preset == "ssd":
        augmentation = "ssd: photometric (p=0.5), zoom-out (p=0.5, <=4x), IoU crop, flip"
    else:
        augmentation = "ssdlite (our configs): IoU crop, flip"
    augmentation += f"; resize {size}x{size} in loader"

    def finish(batch: Any) -> Any:
        return data.on_after_batch_transfer(batch, 0)

    return Pipeline(f"ours ({preset})", augmentation, workers, batch, make_loader, finish)


def _reference_mean() -> tuple[float, float, float]:
    """Default of the ``ssd`` preset's fill dict (a module function so workers can pickle it)."""
    return REFERENCE_MEAN


class ReferenceTransforms:
    """The v2 transforms of torchvision's reference ``DetectionPresetTrain`` (``backend="pil"``,
    ``use_v2=True``) for ``preset`` ``"ssdlite"`` or ``"ssd"``; with ``resize``, then the
    model's resize to ``resize`` x ``resize`` (bilinear ``F.interpolate``, boxes scaled)."""

    def __init__(self, preset: str, resize: int | None = None, hflip_prob: float = 0.5) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        steps: list[Callable[..., Any]] = []
        if preset == "ssd":
            fill = defaultdict(_reference_mean, {tv_tensors.Mask: 0})
            steps += [v2.RandomPhotometricDistort(), v2.RandomZoomOut(fill=fill)]
        elif preset != "ssdlite":
            raise ValueError(f"preset must be 'ssdlite' or 'ssd'; got {preset!r}")
        steps += [
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(p=hflip_prob),
            v2.ToImage(),  # backend "pil": the PIL image becomes a tensor after augmentation
            v2.ToDtype(torch.float, scale=True),
            v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY),
            v2.SanitizeBoundingBoxes(),
            v2.ToPureTensor(),
        ]
        self.transforms = v2.Compose(steps)
        self.resize = resize

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.transforms(image, target)
        if self.resize is not None:
            height, width = image.shape[-2:]
            size = (self.resize, self.resize)
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            scale = torch.tensor([size[1] / width, size[0] / height] * 2)
            target = {**target, "boxes": target["boxes"] * scale}
        return image, target


class ReferenceV1Transforms:
    """What ``train.py --data-augmentation ssdlite`` runs *without* ``--use-v2`` (its default):
    the reference's ``ConvertCocoPolysToMask`` (boxes to xyxy, crowd and empty boxes dropped,
    one full-size mask per object decoded from its polygons with pycocotools) and its own
    ``transforms.py`` ``RandomIoUCrop`` (image and boxes; the masks stay uncropped there),
    ``RandomHorizontalFlip`` (image, boxes and masks), ``PILToTensor``, ``ToDtype(float,
    scale=True)``. Written here after the reference's algorithm (not installed with
    torchvision); the random draws use ``torch``'s generator as the reference does."""

    options = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)

    def __call__(self, image: Any, annotations: list[dict[str, Any]]) -> tuple[Tensor, dict]:
        from pycocotools import mask as coco_mask
        from torchvision.transforms import functional as TF

        width, height = image.size
        anns = [a for a in annotations if a.get("iscrowd", 0) == 0]
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        masks = []
        for a in anns:
            decoded = coco_mask.decode(coco_mask.frPyObjects(a["segmentation"], height, width))
            masks.append(torch.as_tensor(decoded, dtype=torch.uint8).reshape(height, width, -1))
        masks_t = (
            torch.stack([m.any(dim=2) for m in masks]).to(torch.uint8)
            if masks
            else torch.zeros((0, height, width), dtype=torch.uint8)
        )
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {"boxes": boxes[keep], "labels": labels[keep], "masks": masks_t[keep]}
        image, target = self._iou_crop(image, target, TF)
        if torch.rand(1) < 0.5:
            image = TF.hflip(image)
            w = image.size[0]
            target["boxes"][:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target["masks"] = target["masks"].flip(-1)
        tensor = TF.convert_image_dtype(TF.pil_to_tensor(image), torch.float)
        return tensor, target

    def _iou_crop(self, image: Any, target: dict, TF: Any) -> tuple[Any, dict]:
        from torchvision.ops import box_iou

        orig_w, orig_h = image.size
        while True:
            threshold = self.options[int(torch.randint(len(self.options), (1,)))]
            if threshold >= 1.0:
                return image, target
            for _ in range(40):
                r = 0.3 + 0.7 * torch.rand(2)
                new_w, new_h = int(orig_w * r[0]), int(orig_h * r[1])
                if not 0.5 <= new_w / max(new_h, 1) <= 2.0:
                    continue
                r = torch.rand(2)
                left, top = int((orig_w - new_w) * r[0]), int((orig_h - new_h) * r[1])
                right, bottom = left + new_w, top + new_h
                if left == right or top == bottom:
                    continue
                boxes = target["boxes"]
                cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
                inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
                if not inside.any():
                    continue
                crop = torch.tensor([[left, top, right, bottom]], dtype=boxes.dtype)
                if box_iou(boxes[inside], crop).max() < threshold:
                    continue
                boxes = boxes[inside] - torch.tensor([left, top, left, top], dtype=boxes.dtype)
                boxes[:, 0::2].clamp_(min=0, max=new_w)
                boxes[:, 1::2].clamp_(min=0, max=new_h)
                target = {**target, "boxes": boxes, "labels": target["labels"][inside]}
                return TF.crop(image, top, left, new_h, new_w), target


class _CocoWithAnnotations(torch.utils.data.Dataset):
    """torchvision's ``CocoDetection`` without transforms, then the v1 reference transforms
    (images without annotations left out, as the reference's training set does)."""

    def __init__(self, root: Path, split: str) -> None:
        self.coco = coco_detection(root, split)
        self.indices = [
            i
            for i, image_id in enumerate(self.coco.ids)
            if self.coco.coco.getAnnIds(imgIds=image_id, iscrowd=None)
        ]
        self.transforms = ReferenceV1Transforms()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image, annotations = self.coco[self.indices[index]]
        return self.transforms(image, annotations)


def reference_v1_pipeline(root: Path, split: str, batch: int, workers: int, seed: int) -> Pipeline:
    """torchvision's reference SSDLite loader as ``train.py`` builds it by default (v1)."""
    dataset = _CocoWithAnnotations(root, split)

    def make_loader() -> DataLoader:
        return reference_loader(dataset, batch, workers, seed)

    augmentation = (
        "ssdlite preset, default v1 path: masks decoded from polygons, IoU crop, flip; no resize"
    )
    return Pipeline(
        "torchvision reference (ssdlite, v1 default)", augmentation, workers, batch, make_loader
    )


def reference_collate(batch: Sequence[Any]) -> tuple[Any, ...]:
    """The reference's ``utils.collate_fn``: ``tuple(zip(*batch))``."""
    return tuple(zip(*batch))


def coco_detection(root: Path, split: str, transforms: Any = None) -> Any:
    """torchvision's ``CocoDetection`` of ``root``'s ``split`` (pycocotools' prints silenced)."""
    from torchvision.datasets import CocoDetection

    ann_file = root / "annotations" / f"instances_{split}.json"
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while loading
        return CocoDetection(str(root / split), str(ann_file), transforms=transforms)


def reference_loader(dataset: Any, batch: int, workers: int, seed: int) -> DataLoader:
    """The reference recipe's training loader over ``dataset``, seeded.

    ``train.py`` batches by aspect ratio (``GroupedBatchSampler``, full batches only); a plain
    random ``BatchSampler`` with ``drop_last=False`` here, so that every pipeline loads every
    image.
    """
    torch.manual_seed(seed)  # augmentation in the main process (workers=0)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch, drop_last=False),
        num_workers=workers,
        collate_fn=reference_collate,
        generator=torch.Generator().manual_seed(seed),  # worker seeds
    )


def reference_pipeline(
    root: Path,
    split: str,
    preset: str,
    resize: int | None,
    batch: int,
    workers: int,
    seed: int,
) -> Pipeline:
    """torchvision's reference training loader for ``preset`` (see the module docstring)."""
    from torchvision.datasets import wrap_dataset_for_transforms_v2

    dataset = coco_detection(root, split, ReferenceTransforms(preset, resize))
    dataset = wrap_dataset_for_transforms_v2(dataset, target_keys=("boxes", "labels", "image_id"))

    def make_loader() -> DataLoader:
        return reference_loader(dataset, batch, workers, seed)

    if preset == "ssd":
        augmentation = "ssd preset: photometric (p=0.5), zoom-out (p=0.5, <=4x), IoU crop, flip"
    else:
        augmentation = "ssdlite preset: IoU crop, flip"
    name = f"torchvision reference ({preset})"
    if resize is None:
        augmentation += "; no resize (variable size, the model resizes)"
    else:
        name += f" + resize {resize} in loader"
        augmentation += f"; + F.interpolate to {resize}x{resize} in loader"
    return Pipeline(name, augmentation, workers, batch, make_loader)


# ---------------------------------------------------------------------------------- timing
def run_pass(pipeline: Pipeline, warmup: int = 1) -> tuple[int, int, float]:
    """One epoch through a fresh loader: ``(images, timed images, timed seconds)``; the first
    ``warmup`` batches (worker start-up) are not timed."""
    loader = pipeline.make_loader()
    iterator = iter(loader)
    total = timed = 0
    for _ in range(warmup):
        images, _ = pipeline.finish(next(iterator))
        total += len(images)
    start = time.perf_counter()
    for batch in iterator:
        images, _ = pipeline.finish(batch)
        timed += len(images)
    seconds = time.perf_counter() - start
    del iterator, loader, images
    gc.collect()  # shut the workers down before the next pass
    return total + timed, timed, seconds


def interleaved(pipelines: list[Pipeline], rounds: int, warmup: int = 1) -> None:
    """``rounds`` passes of every pipeline, one each per round, the order rotated every round."""
    for r in range(rounds):
        shift = r % len(pipelines)
        for pipeline in pipelines[shift:] + pipelines[:shift]:
            total, timed, seconds = run_pass(pipeline, warmup)
            pipeline.images_per_pass.append(total)
            pipeline.images_per_s.append(timed / seconds if seconds > 0 else float("inf"))


def median_iqr(values: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range."""
    q25, q75 = np.percentile(values, [25, 75])
    return float(statistics.median(values)), float(q75 - q25)


def _preset(pipeline: Pipeline) -> str:
    """``"ssdlite"`` or ``"ssd"``: the augmentation preset of a row."""
    return "ssdlite" if "(ssdlite" in pipeline.name else "ssd"


def _baseline(pipelines: list[Pipeline], workers: int, preset: str) -> Pipeline | None:
    """The reference row (no resize in the loader) of ``preset`` with ``workers``."""
    for p in pipelines:
        if p.name == f"torchvision reference ({preset})" and p.workers == workers:
            return p
    return None


def table(pipelines: list[Pipeline]) -> str:
    """The Markdown table: one row per pipeline, ratios to the reference of the same preset."""
    lines = [
        "| pipeline | augmentation | workers | batch | images/s (median) | IQR | "
        "vs torchvision reference (same preset) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in pipelines:
        rate, iqr = median_iqr(p.images_per_s)
        base = _baseline(pipelines, p.workers, _preset(p))
        ratio = f"{rate / median_iqr(base.images_per_s)[0]:.2f}x" if base else "n/a"
        lines.append(
            f"| {p.name} | {p.augmentation} | {p.workers} | {p.batch} | {rate:.1f} | {iqr:.1f} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def summary(pipelines: list[Pipeline]) -> list[str]:
    """``ours / reference`` for every reference row, per number of workers."""
    lines = []
    for ours in (p for p in pipelines if p.name.startswith("ours")):
        rate = median_iqr(ours.images_per_s)[0]
        ratios = [
            f"{p.name}: {rate / median_iqr(p.images_per_s)[0]:.2f}x"
            for p in pipelines
            if p.workers == ours.workers
            and not p.name.startswith("ours")
            and _preset(p) == _preset(ours)
        ]
        lines.append(f"workers {ours.workers}, {ours.name} / " + "; ".join(ratios))
    return lines


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--images", type=int, default=256, help="images per pass (epoch)")
    parser.add_argument("--batch-size", type=int, default=24,
                        help="images per batch (our configs' per-GPU batch)")  # fmt: skip
    parser.add_argument("--workers", type=int, nargs="+", default=[2],
                        help="DataLoader workers; several values give several rows")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed batches at the start of every pass")  # fmt: skip
    parser.add_argument("--size", type=int, default=320, help="training input side")
    parser.add_argument("--presets", nargs="+", default=["ssdlite", "ssd"],
                        choices=["ssdlite", "ssd"], help="reference presets to time")  # fmt: skip
    parser.add_argument("--no-v1", action="store_true",
                        help="leave out the reference's default (v1, masks decoded) row")  # fmt: skip
    parser.add_argument("--no-resize", action="store_true",
                        help="leave out the reference '+ resize in loader' rows")  # fmt: skip
    parser.add_argument("--root", type=Path, default=None,
                        help="a real COCO root (its first --images annotated images of --split); "
                        "default: generate COCO-like JPEGs in a temporary folder")  # fmt: skip
    parser.add_argument("--split", default="train2017", help="split of --root")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the main process, which runs the transforms "
                        "with --workers 0 (default: torch's; workers use 1 each)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of data, order, augmentation")
    parser.add_argument("--no-load-check", action="store_true",
                        help="skip the machine-load measurement before and after")  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.rounds < 1 or args.warmup < 1 or min(args.workers) < 0:
        parser.error("--batch-size, --rounds and --warmup must be >= 1, --workers >= 0")
    if args.images <= args.warmup * args.batch_size:
        parser.error("--images must exceed --warmup x --batch-size (the untimed batches)")
    return args


def build(args: argparse.Namespace, root: Path) -> list[Pipeline]:
    """Every pipeline to time, per number of workers."""
    pipelines = []
    for workers in args.workers:
        common = {"batch": args.batch_size, "workers": workers, "seed": args.seed}
        for preset in args.presets:
            pipelines.append(our_pipeline(root, args.split, preset, args.size, **common))
            for resize in (None,) if args.no_resize else (None, args.size):
                pipelines.append(reference_pipeline(root, args.split, preset, resize, **common))
            if preset == "ssdlite" and not args.no_v1:
                pipelines.append(reference_v1_pipeline(root, args.split, **common))
    return pipelines


def run_benchmark(args: argparse.Namespace) -> list[Pipeline]:
    """Write (or subset) the data, build the pipelines and time them."""
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        if args.root is None:
            root = write_synthetic_coco(Path(tmp), args.images, args.seed, args.split)
        else:
            root = coco_subset(args.root, Path(tmp), args.images, args.split)
        pipelines = build(args, root)
        interleaved(pipelines, args.rounds, args.warmup)
    return pipelines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    import albumentations
    import cv2
    import PIL
    import torchvision
    from PIL import features

    from mnv3det.deploy.benchmark.timing import load_report, machine_load

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = f"{args.root} ({args.split})" if args.root else "generated COCO-like JPEGs"
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, albumentations "
        f"{albumentations.__version__}, Pillow {PIL.__version__} (libjpeg-turbo: "
        f"{features.check_feature('libjpeg_turbo')}), OpenCV {cv2.__version__}; "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}\n"
        f"{args.images} images ({data}) per pass, batch {args.batch_size}, workers "
        f"{args.workers}, first {args.warmup} batch(es) of each pass untimed, "
        f"{args.rounds} interleaved rounds"
    )
    threads = torch.get_num_threads()
    before = None if args.no_load_check else machine_load(threads)
    pipelines = run_benchmark(args)
    after = None if args.no_load_check else machine_load(threads)
    print(table(pipelines))
    print()
    for line in summary(pipelines):
        print(line)
    counts = {p.name + f" (workers {p.workers})": sorted(set(p.images_per_pass)) for p in pipelines}
    if all(c == [args.images] for c in counts.values()):
        print(f"every pipeline loaded all {args.images} images in every pass")
    else:
        print(f"WARNING: images per pass differ: {counts}")
    print(
        "Note: the reference loader yields images at their own size (about 640x480) and its model "
        f"resizes them to {args.size}x{args.size} (GeneralizedRCNNTransform, on the training "
        "device); ours resizes in the loader. The '+ resize in loader' rows add that resize "
        "(bilinear F.interpolate per image) to the reference's loader for comparable work."
    )
    for line in load_report(before, after):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
