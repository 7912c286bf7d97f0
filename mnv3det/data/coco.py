"""COCO detection data (official layout, read through pycocotools) for SSDLite (paper §6.3).

Layout::

    root/train2017/*.jpg    root/val2017/*.jpg
    root/annotations/instances_train2017.json    root/annotations/instances_val2017.json

Label mapping (``label_map=``)
------------------------------
COCO's 80 categories have ids 1..90 with gaps (12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
Label 0 is always the background.

* ``"contiguous"`` (default): the categories of the annotation file, sorted by id, become labels
  1..K; ``num_classes = K + 1`` (81 for COCO). Use this to train a new model on any COCO-format
  data (e.g. the generated shapes, whose ids 1, 3, 7, 12 become labels 1, 2, 3, 4).
* ``"torchvision91"``: label == category id, ``num_classes = 91`` whatever the file holds; unused
  slots are named ``"N/A"`` in :attr:`CocoDetection.class_names`. This is the layout of
  torchvision's detection checkpoints (``ssdlite320_mobilenet_v3_large`` has 91 outputs), so use it
  to fine-tune or evaluate those weights. Category ids must lie in 1..90.

:attr:`CocoDetection.label_to_cat_id` maps a predicted label back to the category id that COCO
results files and ``COCOeval`` need; :attr:`CocoDetection.cat_id_to_label` goes the other way.

Data rules
----------
* ``iscrowd=1`` boxes are never trained on (they are left out of the target and counted) but stay in
  ``.coco`` / the annotation file, where ``COCOeval`` uses them to ignore detections on crowds.
* Images without (non-crowd) boxes are kept as negatives (``empty_images="keep"``) or left out
  (``"skip"``), and counted.
* Boxes are clipped to the image and counted; boxes that are degenerate (width or height below
  ``min_box_size`` pixels after clipping, or non-finite) or wholly outside the image are dropped and
  counted.
* An annotation whose category id is not in ``categories``, an image file that does not exist, or an
  image file that cannot be decoded is an error naming it; with ``on_error="skip"`` the annotation /
  image is left out and counted instead (an undecodable image is found only when it is read: the
  item is then replaced by the next readable image, so an epoch does not crash, and counted).
* Grayscale, palette, RGBA and EXIF-rotated files come out as upright RGB
  (:func:`mnv3det.data.image_io.read_rgb`); boxes are taken to be in the upright frame.

All counts are in :attr:`CocoDetection.stats`; ``stats.report()`` gives one line for the log.
Counts made while reading items live in shared memory, so they include DataLoader workers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from mnv3det.data.image_io import ImageReadError, read_rgb
from mnv3det.data.sampling import SampleKey, reseed_transforms, split_key

__all__ = [
    "IMAGE_EXTENSIONS",
    "CocoDataError",
    "CocoDetection",
    "DatasetStats",
    "DetectionImageFolder",
    "MissingImageError",
    "UnknownCategoryError",
    "collate_detection",
    "image_to_tensor",
]

LABEL_MAPS = ("contiguous", "torchvision91")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class CocoDataError(ValueError):
    """The annotation file or the data it points to is wrong in a way training cannot survive."""


class UnknownCategoryError(CocoDataError):
    """An annotation names a category id that the file's ``categories`` list does not define."""


class MissingImageError(FileNotFoundError):
    """An image listed in the annotation file does not exist on disk."""


# Counters filled while reading items (possibly inside DataLoader worker processes).
_RUNTIME_KEYS = ("unreadable_images_skipped", "image_size_mismatch", "boxes_dropped_at_load")


class DatasetStats:
    """Counters of what a :class:`CocoDetection` dropped, clipped or skipped.

    ``counts`` are made once when the annotation file is indexed; the run-time counters
    (unreadable images skipped, file size differing from the annotation file) are kept in a
    shared-memory tensor so that increments made in DataLoader workers are seen here.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()
        self._runtime = torch.zeros(len(_RUNTIME_KEYS), dtype=torch.int64).share_memory_()

    def add_runtime(self, key: str, n: int = 1) -> None:
        """Count a run-time event (``key`` in ``unreadable_images_skipped``,
        ``image_size_mismatch``, ``boxes_dropped_at_load``)."""
        self._runtime[_RUNTIME_KEYS.index(key)] += n

    def as_dict(self) -> dict[str, int]:
        """All counters, the indexing ones and the run-time ones, as plain ints."""
        out = {k: int(v) for k, v in self.counts.items()}
        out.update({k: int(v) for k, v in zip(_RUNTIME_KEYS, self._runtime.tolist())})
        return out

    def __getitem__(self, key: str) -> int:
        return self.as_dict().get(key, 0)

    def report(self) -> str:
        """One human-readable line: what is used and everything that was left out or changed."""
        c = self.as_dict()
        empty_kept = c.get("empty_images_kept", 0)
        parts = [
            f"{self.name}: {c.get('images_used', 0)} of {c.get('images_in_file', 0)} images used "
            f"({empty_kept} without boxes, kept as negatives), {c.get('boxes_used', 0)} boxes"
        ]
        details = [
            ("crowd_boxes_excluded", "crowd boxes not trained on (kept for evaluation)"),
            ("boxes_clipped", "boxes clipped to the image"),
            ("degenerate_boxes_dropped", "degenerate boxes dropped"),
            ("outside_boxes_dropped", "boxes outside the image dropped"),
            ("empty_images_skipped", "images without boxes skipped"),
            ("unknown_category_annotations_skipped", "annotations with unknown category skipped"),
            ("missing_images_skipped", "missing image files skipped"),
            ("orphan_annotations", "annotations of images not in the file ignored"),
            ("unreadable_images_skipped", "unreadable images skipped when read"),
            ("image_size_mismatch", "image reads whose size differs from the annotation file"),
            ("boxes_dropped_at_load", "boxes dropped after clipping to the decoded image"),
        ]
        extra = [f"{c[k]} {text}" for k, text in details if c.get(k, 0)]
        return "; ".join(parts + extra)

    def __repr__(self) -> str:
        return f"DatasetStats({self.report()})"


def image_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 / float array (or a ``(3, H, W)`` tensor) as a float ``(3, H, W)``
    tensor in [0, 1] (uint8 is divided by 255; float input is taken to be in [0, 1] already)."""
    if isinstance(image, torch.Tensor):
        tensor = image
        if tensor.ndim == 3 and tensor.shape[0] not in (1, 3) and tensor.shape[-1] in (1, 3):
            tensor = tensor.permute(2, 0, 1)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    return tensor.float()


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Collate ``(image, target)`` items into ``(list of images, list of targets)``: detection
    images differ in size and targets in box count, so nothing is stacked (torchvision's
    detection models take lists)."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")


class CocoDetection(Dataset):
    """COCO-format detection data set: items ``(image, target)`` in torchvision's conventions.

    ``image`` is a float ``(3, H, W)`` tensor in [0, 1]; ``target`` has ``"boxes"`` (float
    ``(N, 4)`` xyxy in pixels of the returned image), ``"labels"`` (int64 ``(N,)``, 1..K, see the
    module docstring for the mapping), ``"image_id"`` (int, COCO's id) and ``"orig_size"``
    (``(H, W)`` of the decoded file, before transforms).

    Args:
        root: data set folder with ``{split}/`` and ``annotations/``.
        split: image folder name, e.g. ``"train2017"`` / ``"val2017"``; the annotation file
            defaults to ``annotations/instances_{split}.json``.
        transforms: called as ``transforms(image=HWC uint8 array, bboxes=(N, 4) pascal_voc array,
            labels=(N,) array)`` and returning a dict with the same keys, i.e. an albumentations
            ``Compose`` with ``BboxParams(format="pascal_voc", label_fields=["labels"])`` (see
            :mod:`mnv3det.data.detection_transforms`). ``None``: no transform.
        label_map: ``"contiguous"`` or ``"torchvision91"``.
        empty_images: ``"keep"`` images without boxes as negatives, or ``"skip"`` them.
        on_error: ``"raise"`` on an unknown category id, missing or unreadable image, or
            ``"skip"`` (and count) the offending annotation / image.
        ann_file: annotation file, overriding ``root/annotations/instances_{split}.json``.
        image_dir: image folder, overriding ``root/{split}``.
        min_box_size: boxes narrower or lower than this (pixels, after clipping) are dropped.

    Raises:
        FileNotFoundError: the annotation file or the image folder does not exist.
        CocoDataError: the annotation file cannot be parsed, or its category ids do not fit
            ``label_map``.
        UnknownCategoryError: (``on_error="raise"``) an annotation has an unknown category id.
        MissingImageError: (``on_error="raise"``) an image file listed in the file is missing.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val2017",
        transforms: Callable[..., dict[str, Any]] | None = None,
        label_map: str = "contiguous",
        empty_images: str = "keep",
        on_error: str = "raise",
        ann_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        min_box_size: float = 1.0,
    ) -> None:
        _check_choice("label_map", label_map, LABEL_MAPS)
        _check_choice("empty_images", empty_images, ("keep", "skip"))
        _check_choice("on_error", on_error, ("raise", "skip"))
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.label_map = label_map
        self.empty_images = empty_images
        self.on_error = on_error
        self.min_box_size = float(min_box_size)
        self.ann_file = (
            Path(ann_file)
            if ann_file is not None
            else self.root / "annotations" / f"instances_{split}.json"
        )
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / split
        if not self.ann_file.is_file():
            raise FileNotFoundError(
                f"COCO annotation file not found: {self.ann_file}. Expected the official layout "
                f"root/annotations/instances_{split}.json (or pass ann_file=)."
            )
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"COCO image folder not found: {self.image_dir}. Expected the official layout "
                f"root/{split}/ (or pass image_dir=)."
            )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(self.ann_file))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CocoDataError(
                f"cannot read COCO annotation file {self.ann_file}: {type(err).__name__}: {err}"
            ) from err

        self.stats = DatasetStats(f"CocoDetection[{split}]")
        self._build_label_map()
        self._index()

    # ------------------------------------------------------------------ label mapping
    def _build_label_map(self) -> None:
        cats = sorted(self.coco.cats.values(), key=lambda c: int(c["id"]))
        if not cats:
            raise CocoDataError(f"{self.ann_file} defines no categories")
        if self.label_map == "contiguous":
            self.label_to_cat_id = {i + 1: int(c["id"]) for i, c in enumerate(cats)}
            self.num_classes = len(cats) + 1
        else:
            bad = [int(c["id"]) for c in cats if not 1 <= int(c["id"]) <= 90]
            if bad:
                raise CocoDataError(
                    f"label_map='torchvision91' needs category ids in 1..90 (label == id), but "
                    f"{self.ann_file} has ids {bad}; use label_map='contiguous'"
                )
            self.label_to_cat_id = {int(c["id"]): int(c["id"]) for c in cats}
            self.num_classes = 91
        self.cat_id_to_label = {cat: label for label, cat in self.label_to_cat_id.items()}
        names = ["N/A"] * self.num_classes
        names[0] = "__background__"
        for c in cats:
            names[self.cat_id_to_label[int(c["id"])]] = str(c.get("name", c["id"]))
        self.class_names: list[str] = names

    # ------------------------------------------------------------------ indexing
    def _index(self) -> None:
        counts = self.stats.counts
        counts["images_in_file"] = len(self.coco.imgs)
        try:
            on_disk = {entry.name for entry in os.scandir(self.image_dir)}
        except OSError:
            on_disk = set()

        known_images = set(self.coco.imgs)
        counts["orphan_annotations"] = sum(
            1 for ann in self.coco.anns.values() if ann.get("image_id") not in known_images
        )

        self.ids: list[int] = []
        self._targets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            file_name = str(info.get("file_name", ""))
            path = self.image_dir / file_name
            exists = file_name in on_disk if "/" not in file_name else path.is_file()
            if not file_name or not exists:
                if self.on_error == "raise":
                    raise MissingImageError(
                        f"image file {path} (image id {image_id} in {self.ann_file}) does not "
                        "exist; restore it, remove the image from the annotation file, or set "
                        "on_error='skip'"
                    )
                counts["missing_images_skipped"] += 1
                continue
            boxes, labels = self._image_target(image_id, info)
            if len(boxes) == 0:
                if self.empty_images == "skip":
                    counts["empty_images_skipped"] += 1
                    continue
                counts["empty_images_kept"] += 1
            counts["boxes_used"] += len(boxes)
            self.ids.append(int(image_id))
            self._targets[int(image_id)] = (boxes, labels)
        counts["images_used"] = len(self.ids)

    def _image_target(self, image_id: int, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Trainable boxes (xyxy, clipped) and labels of one image, counting what is left out."""
        counts = self.stats.counts
        width = float(info.get("width", 0) or 0)
        height = float(info.get("height", 0) or 0)
        boxes: list[list[float]] = []
        labels: list[int] = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            cat_id = ann.get("category_id")
            if cat_id not in self.cat_id_to_label:
                if self.on_error == "raise":
                    raise UnknownCategoryError(
                        f"annotation id {ann.get('id')} (image id {image_id}) in {self.ann_file} "
                        f"has category_id {cat_id!r}, which is not among the file's categories "
                        f"{sorted(self.cat_id_to_label)}; fix the annotation or set "
                        "on_error='skip'"
                    )
                counts["unknown_category_annotations_skipped"] += 1
                continue
            if ann.get("iscrowd", 0):
                counts["crowd_boxes_excluded"] += 1
                continue
            box = _xywh_to_clipped_xyxy(ann.get("bbox"), width, height, self.min_box_size)
            if isinstance(box, str):
                counts[box] += 1
                continue
            xyxy, clipped = box
            counts["boxes_clipped"] += int(clipped)
            boxes.append(xyxy)
            labels.append(self.cat_id_to_label[cat_id])
        return (
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
        )

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        """The file of item ``index``."""
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def _read(self, index: int) -> np.ndarray:
        image_id = self.ids[index]
        path = self.image_path(index)
        try:
            return read_rgb(path)
        except FileNotFoundError as err:
            raise MissingImageError(
                f"image file {path} (image id {image_id} in {self.ann_file}) disappeared after the "
                "data set was indexed; restore it or set on_error='skip'"
            ) from err
        except ImageReadError as err:
            raise ImageReadError(
                f"{err} (image id {image_id} in {self.ann_file}); replace or remove the file, or "
                "set on_error='skip'"
            ) from err

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, dict[str, Any]]:
        # key: an index, or (index, augmentation seed) from the resumable training sampler
        index, seed = split_key(key)
        reseed_transforms(self.transforms, seed)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            try:
                image = self._read(current)
            except (ImageReadError, MissingImageError):
                if self.on_error == "raise":
                    raise
                # Skip mode: never crash mid-epoch; use the next readable image instead.
                self.stats.add_runtime("unreadable_images_skipped")
                continue
            return self._make_item(current, image)
        raise CocoDataError(f"no image of {self.image_dir} could be read")

    def _make_item(self, index: int, image: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        boxes, labels = self._targets[image_id]
        height, width = image.shape[:2]
        info = self.coco.imgs[image_id]
        if (info.get("height"), info.get("width")) != (height, width):
            # The file disagrees with the annotation file: clip to what was decoded.
            self.stats.add_runtime("image_size_mismatch")
            boxes = boxes.copy()
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
            keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_box_size) & (
                (boxes[:, 3] - boxes[:, 1]) >= self.min_box_size
            )
            if not keep.all():
                self.stats.add_runtime("boxes_dropped_at_load", int((~keep).sum()))
            boxes, labels = boxes[keep], labels[keep]
        if self.transforms is not None:
            out = self.transforms(image=image, bboxes=boxes, labels=labels)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        target = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
            "image_id": int(image_id),
            "orig_size": (int(height), int(width)),
        }
        return image_to_tensor(image), target

    def __repr__(self) -> str:
        return (
            f"CocoDetection(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"num_classes={self.num_classes}, label_map={self.label_map!r})"
        )


def _xywh_to_clipped_xyxy(
    bbox: Any, width: float, height: float, min_size: float
) -> tuple[list[float], bool] | str:
    """COCO ``[x, y, w, h]`` -> (xyxy clipped to the image, was it clipped), or the name of the
    counter to bump when the box is dropped."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return "degenerate_boxes_dropped"
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
        return "degenerate_boxes_dropped"
    x0, y0, x1, y1 = x, y, x + w, y + h
    if width > 0 and height > 0:
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            return "outside_boxes_dropped"
        cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    else:  # the file gives no size: clip only at 0
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), x1, y1
    clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
    if cx1 - cx0 < min_size or cy1 - cy0 < min_size:
        return "degenerate_boxes_dropped"
    return [cx0, cy0, cx1, cy1], clipped


class DetectionImageFolder(Dataset):
    """Images to predict on: items ``(image, {"image_id", "file_name", "orig_size"})``.

    Args:
        folder: image folder.
        files: file names relative to ``folder`` (default: every image file in it, recursively,
            sorted).
        image_ids: ``file_name -> image id`` (e.g. COCO's ids, so predictions can be evaluated);
            default: the position in the sorted list.
        on_error: ``"raise"`` on an unreadable image, or ``"skip"`` it (the next readable image is
            returned instead and the skip is counted in ``.skipped``).
    """

    def __init__(
        self,
        folder: str | Path,
        files: Sequence[str] | None = None,
        image_ids: dict[str, int] | None = None,
        on_error: str = "raise",
    ) -> None:
        _check_choice("on_error", on_error, ("raise", "skip"))
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.folder}")
        if files is None:
            files = sorted(
                str(p.relative_to(self.folder))
                for p in self.folder.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        if not files:
            raise FileNotFoundError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {self.folder}"
            )
        self.files = list(files)
        self.image_ids = image_ids
        self.on_error = on_error
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, dict[str, Any]]:
        # key: an index, or (index, seed) from the resumable sampler (no augmentation to reseed)
        index, _ = split_key(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            file_name = self.files[current]
            try:
                image = read_rgb(self.folder / file_name)
            except (ImageReadError, FileNotFoundError):
                if self.on_error == "raise":
                    raise
                self.skipped += 1
                continue
            image_id = self.image_ids[file_name] if self.image_ids is not None else current
            meta = {
                "image_id": int(image_id),
                "file_name": file_name,
                "orig_size": (int(image.shape[0]), int(image.shape[1])),
            }
            return image_to_tensor(image), meta
        raise CocoDataError(f"no image of {self.folder} could be read")
