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
  ``.coco`` (the annotation file as read by pycocotools), where ``COCOeval`` uses them to ignore
  detections on crowds.
* Images without (non-crowd) boxes are kept as negatives (``empty_images="keep"``) or left out
  (``"skip"``), and counted.
* Boxes sticking out of the image are clipped and counted; boxes that are not four finite numbers,
  have no area (or are under ``min_box_size`` pixels after clipping), or lie wholly outside the
  image are dropped, counted and listed per file. Nothing else reaches the loss: every target box
  is finite, inside its image and has a label of the model's classes.
* The data set is checked when it is built, before any training: the annotation file's structure,
  every annotation's image and category id, and the header of every image file (it exists, PIL can
  read it, JPEG/PNG files are not truncated, and its size after the EXIF orientation equals the
  ``width``/``height`` of the annotation file). The scan reads headers, not pixels
  (:func:`mnv3det.data.image_io.read_headers`, a thread pool; ``tools/scan_speed.py`` times it).
* ``on_error="raise"`` (default): any problem is an error naming the file or annotation id and the
  fix (the first one, with the number of the others). ``on_error="skip"``: bad images are removed
  from the index before sampling (no substitutes, no duplicates) and bad annotations from their
  image's target; each is listed in :attr:`DatasetStats.problems` (the data module writes them to
  ``skipped.csv`` in the run's log folder and prints a summary at the end of the run).
* A file that passed the scan but cannot be decoded when read (truncated after the end marker,
  or changed during the run) is an error in ``raise`` mode; in ``skip`` mode its item is an empty
  :class:`~mnv3det.data.problems.SkippedSample` that :func:`collate_detection` leaves out of the
  batch, and the file is listed (once, also when found in a DataLoader worker).
* Grayscale (1/8/16 bit), palette, RGBA, CMYK and EXIF-rotated files come out as upright RGB
  (:func:`mnv3det.data.image_io.read_rgb`); boxes are taken to be in the upright frame.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from mnv3det.data.image_io import ImageHeader, ImageReadError, read_headers, read_rgb
from mnv3det.data.problems import (
    FILE_SKIP_HINT,
    DatasetStats,
    SkippedSample,
    drop_skipped,
    unreadable_file_error,
)
from mnv3det.data.sampling import SampleKey, reseed_transforms, split_key

__all__ = [
    "IMAGE_EXTENSIONS",
    "CocoDataError",
    "CocoDetection",
    "DatasetStats",
    "DetectionImageFolder",
    "EmptySplitError",
    "ImageSizeMismatchError",
    "MissingImageError",
    "UnknownCategoryError",
    "UnknownImageIdError",
    "collate_detection",
    "image_to_tensor",
    "image_to_uint8_tensor",
    "load_annotation_file",
]

LABEL_MAPS = ("contiguous", "torchvision91")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class CocoDataError(ValueError):
    """The annotation file or the data it points to is wrong in a way training cannot survive."""


class UnknownCategoryError(CocoDataError):
    """An annotation names a category id that the file's ``categories`` list does not define."""


class UnknownImageIdError(CocoDataError):
    """An annotation names an image id that the file's ``images`` list does not define."""


class ImageSizeMismatchError(CocoDataError):
    """An image file's size (after its EXIF orientation) differs from the annotation file's."""


class EmptySplitError(CocoDataError):
    """A split has no usable image (left)."""


class MissingImageError(FileNotFoundError):
    """An image listed in the annotation file does not exist on disk."""


def image_to_uint8_tensor(image: np.ndarray) -> torch.Tensor:
    """An ``(H, W, 3)`` array as a ``(3, H, W)`` tensor of the same dtype and values (no copy of
    a C-contiguous array, no scaling): uint8 pixels for :mod:`mnv3det.data.batches`."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def image_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 / float array (or a ``(3, H, W)`` tensor) as a float ``(3, H, W)``
    tensor in [0, 1] (uint8 is divided by 255; float input is taken to be in [0, 1] already)."""
    if isinstance(image, torch.Tensor):
        tensor = image
        if tensor.ndim == 3 and tensor.shape[0] not in (1, 3) and tensor.shape[-1] in (1, 3):
            tensor = tensor.permute(2, 0, 1)
    else:
        tensor = image_to_uint8_tensor(image)
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    return tensor.float()


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Collate ``(image, target)`` items into ``(list of images, list of targets)``: detection
    images differ in size and targets in box count, so nothing is stacked (torchvision's
    detection models take lists). Items that could not be read mid-run
    (:class:`~mnv3det.data.problems.SkippedSample`) are left out."""
    batch = drop_skipped(batch)
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")


def load_annotation_file(path: str | Path) -> dict[str, Any]:
    """Read a COCO annotation file and check its structure.

    Args:
        path: the JSON file.

    Returns:
        The parsed object (``images``, ``annotations``, ``categories`` lists).

    Raises:
        FileNotFoundError: the file does not exist.
        CocoDataError: it is not JSON, not an object, lacks ``images`` / ``categories``, has an
            empty image list, or holds entries that are not objects with ids (names the file and
            the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    expected = (
        "a COCO annotation file is a JSON object with 'images', 'annotations' and 'categories' "
        "lists (instances_{split}.json)"
    )
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CocoDataError(f"{path} is not JSON ({err}); {expected}") from err
    if not isinstance(data, dict):
        what = "a list (a results file?)" if isinstance(data, list) else type(data).__name__
        raise CocoDataError(f"{path} holds {what}, not a JSON object; {expected}")
    for key in ("images", "categories"):
        if key not in data:
            raise CocoDataError(f"{path} has no {key!r} key; {expected}")
    for key in ("images", "annotations", "categories"):
        if key in data and not isinstance(data[key], list):
            raise CocoDataError(
                f"{path}: {key!r} is a {type(data[key]).__name__}, not a list; {expected}"
            )
    if not data["images"]:
        raise EmptySplitError(
            f"{path} lists no images ('images' is empty); point the data module at the "
            "annotation file of a split with images"
        )
    data.setdefault("annotations", [])
    for key, needed in (("annotations", ("id", "image_id")), ("categories", ("id",))):
        for position, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or any(k not in entry for k in needed):
                raise CocoDataError(
                    f"{path}: {key}[{position}] is {str(entry)[:80]!r}, not an object with "
                    f"{' and '.join(repr(k) for k in needed)}; fix or remove that entry"
                )
    return data


def _make_coco(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """COCO-format detection data set: items ``(image, target)`` in torchvision's conventions.

    ``image`` is a float ``(3, H, W)`` tensor in [0, 1] (uint8 pixels with
    ``uint8_images=True``); ``target`` has ``"boxes"`` (float
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
        on_error: ``"raise"`` on any problem the scan finds (see the module docstring), or
            ``"skip"`` the offending image / annotation and list it in ``stats.problems``.
        ann_file: annotation file, overriding ``root/annotations/instances_{split}.json``.
        image_dir: image folder, overriding ``root/{split}``.
        min_box_size: boxes narrower or lower than this (pixels, after clipping) are dropped.
        scan_threads: threads of the header scan (``None``: ``min(32, 4 * CPUs)``).
        uint8_images: return images as uint8 ``(3, H, W)`` tensors, not scaled to [0, 1]: the
            compact training batches of :mod:`mnv3det.data.batches`, scaled on the device.

    Raises:
        FileNotFoundError: the annotation file or the image folder does not exist.
        CocoDataError: the annotation file cannot be parsed, its category ids do not fit
            ``label_map``, no usable image is left, or (``on_error="raise"``) a problem of the
            scan: :class:`UnknownCategoryError`, :class:`UnknownImageIdError`,
            :class:`ImageSizeMismatchError`, duplicate image ids.
        MissingImageError: (``on_error="raise"``) an image file listed in the file is missing.
        ImageReadError: (``on_error="raise"``) an image file cannot be read.
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
        scan_threads: int | None = None,
        uint8_images: bool = False,
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
        self.uint8_images = uint8_images
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
        data = load_annotation_file(self.ann_file)
        self.stats = DatasetStats(f"CocoDetection[{split}]", split)
        self._errors: list[Exception] = []
        data = self._check_image_entries(data)
        self.coco = _make_coco(data)
        self._build_label_map()
        self._index(scan_threads)

    # ------------------------------------------------------------------ problems
    def _problem(self, file: str, reason: str, detail: str, error: Exception) -> None:
        """Record a problem; in raise mode keep the error to raise once the scan is done."""
        self.stats.add(file, reason, detail)
        if self.on_error == "raise":
            self._errors.append(error)

    def _raise_first(self) -> None:
        if not self._errors:
            return
        first = self._errors[0]
        if len(self._errors) > 1:
            kinds = Counter(row.reason for row in self.stats.problems)
            more = ", ".join(f"{n} {reason}" for reason, n in sorted(kinds.items()))
            note = f" [{len(self._errors)} problems in {self.ann_file.name}: {more}]"
            first.args = (str(first.args[0]) + note, *first.args[1:])
        raise first

    def _check_image_entries(self, data: dict[str, Any]) -> dict[str, Any]:
        """Drop (skip) or report (raise) image entries without id / file_name or with a
        duplicate id; pycocotools would keep only the last of a duplicate id silently."""
        seen: dict[Any, list[dict[str, Any]]] = {}
        bad = []
        for position, entry in enumerate(data["images"]):
            ok = isinstance(entry, dict) and isinstance(entry.get("id"), int)
            ok = ok and isinstance(entry.get("file_name"), str) and entry["file_name"] != ""
            if not ok:
                bad.append(position)
                self._problem(
                    str(entry.get("file_name", "")) if isinstance(entry, dict) else "",
                    "bad_image_entry",
                    f"images[{position}] = {str(entry)[:80]}",
                    CocoDataError(
                        f"{self.ann_file}: images[{position}] is {str(entry)[:80]!r}, not an "
                        "object with an integer 'id' and a 'file_name'; fix or remove it, "
                        + FILE_SKIP_HINT
                    ),
                )
                continue
            seen.setdefault(entry["id"], []).append(entry)
        duplicates = {i for i, entries in seen.items() if len(entries) > 1}
        for image_id in sorted(duplicates):
            names = [e["file_name"] for e in seen[image_id]]
            for name in names:
                self._problem(
                    name,
                    "duplicate_image_id",
                    f"image id {image_id} is listed for {names}",
                    CocoDataError(
                        f"{self.ann_file}: image id {image_id} is listed {len(names)} times "
                        f"({names}); its annotations cannot be told apart. Give every image its "
                        "own id, " + FILE_SKIP_HINT + " (every entry with that id)"
                    ),
                )
        self._dropped_ids = duplicates  # their annotations are not "unknown image ids"
        if not bad and not duplicates:
            return data
        bad_set = set(bad)
        images = [
            e
            for i, e in enumerate(data["images"])
            if i not in bad_set and e["id"] not in duplicates
        ]
        return {**data, "images": images}

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
    def _index(self, scan_threads: int | None) -> None:
        counts = self.stats.counts
        counts["images_listed"] = len(self.coco.dataset["images"])
        counts["images_in_file"] = counts["images_listed"]
        for ann in self.coco.dataset["annotations"]:
            if ann["image_id"] not in self.coco.imgs and ann["image_id"] not in self._dropped_ids:
                counts["unknown_image_id_count"] += 1
                self._problem(
                    self.ann_file.name,
                    "unknown_image_id",
                    f"annotation id {ann['id']} has image_id {ann['image_id']!r}",
                    UnknownImageIdError(
                        f"annotation id {ann['id']} in {self.ann_file} has image_id "
                        f"{ann['image_id']!r}, which is not among the file's images; fix its "
                        "image_id or remove it, " + FILE_SKIP_HINT
                    ),
                )
        image_ids = sorted(self.coco.imgs)
        file_names = [str(self.coco.imgs[i]["file_name"]) for i in image_ids]
        headers = read_headers([self.image_dir / f for f in file_names], threads=scan_threads)
        self.ids: list[int] = []
        self._targets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._sizes: dict[int, tuple[int, int]] = {}
        for image_id, file_name, header in zip(image_ids, file_names, headers, strict=True):
            size = self._check_file(image_id, file_name, header)
            boxes, labels = self._image_target(image_id, file_name, size)
            if size is None:
                continue
            if len(boxes) == 0:
                if self.empty_images == "skip":
                    counts["empty_images_skipped"] += 1
                    continue
                counts["empty_images_kept"] += 1
            counts["boxes_used"] += len(boxes)
            self.ids.append(int(image_id))
            self._targets[int(image_id)] = (boxes, labels)
            self._sizes[int(image_id)] = size
        counts["images_used"] = len(self.ids)
        self._raise_first()
        if not self.ids:
            raise EmptySplitError(
                f"no usable image in {self.image_dir} with {self.ann_file} "
                f"({counts['images_listed']} listed; {self._left_out()}); fix the data or the "
                "paths"
            )
        self.stats.set_items([self.coco.imgs[i]["file_name"] for i in self.ids])

    def _left_out(self) -> str:
        by_reason = self.stats.files_by_reason()
        parts = [f"{n} {r}" for r, n in sorted(by_reason.items())]
        if self.stats.counts.get("empty_images_skipped"):
            parts.append(f"{self.stats.counts['empty_images_skipped']} without boxes skipped")
        return "left out: " + (", ".join(parts) or "none")

    def _check_file(
        self, image_id: int, file_name: str, header: ImageHeader | Exception
    ) -> tuple[int, int] | None:
        """The upright ``(height, width)`` of a usable file, else ``None`` (problem recorded)."""
        path = self.image_dir / file_name
        where = f"image id {image_id} in {self.ann_file}"
        if isinstance(header, FileNotFoundError):
            self._problem(
                file_name,
                "missing_file",
                str(path),
                MissingImageError(
                    f"image file {path} ({where}) does not exist; restore it, remove the image "
                    "from the annotation file, " + FILE_SKIP_HINT
                ),
            )
            return None
        if isinstance(header, Exception):
            self._problem(
                file_name,
                "unreadable_file",
                str(header),
                ImageReadError(
                    f"{header} ({where}); replace or remove the file, " + FILE_SKIP_HINT
                ),
            )
            return None
        info = self.coco.imgs[image_id]
        want_h, want_w = info.get("height"), info.get("width")
        if not want_h or not want_w:  # the file gives no size: take the file's
            self.stats.counts["sizes_taken_from_files"] += 1
            return header.height, header.width
        if (int(want_h), int(want_w)) != (header.height, header.width):
            rotated = (
                f" (stored {header.stored_size[1]}x{header.stored_size[0]}, EXIF orientation "
                f"{header.orientation}: annotations must be in the upright frame)"
                if header.orientation != 1
                else ""
            )
            detail = (
                f"annotation file says {want_w}x{want_h} (WxH), the file is "
                f"{header.width}x{header.height}{rotated}"
            )
            self._problem(
                file_name,
                "size_mismatch",
                detail,
                ImageSizeMismatchError(
                    f"image file {path} ({where}): {detail}. If the image was resized after it "
                    "was annotated, its boxes are at the wrong scale: restore the original file or "
                    "rescale its annotations and width/height, " + FILE_SKIP_HINT
                ),
            )
            return None
        return header.height, header.width

    def _image_target(
        self, image_id: int, file_name: str, size: tuple[int, int] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Trainable boxes (xyxy, clipped) and labels of one image, recording what is left out
        (annotation problems are recorded even when the image itself is unusable)."""
        counts = self.stats.counts
        height, width = size if size is not None else (0, 0)
        boxes: list[list[float]] = []
        labels: list[int] = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            cat_id = ann.get("category_id")
            if cat_id not in self.cat_id_to_label:
                counts["unknown_category_count"] += 1
                counts["unknown_category_annotations_skipped"] += 1
                self._problem(
                    file_name,
                    "unknown_category",
                    f"annotation id {ann.get('id')} has category_id {cat_id!r}",
                    UnknownCategoryError(
                        f"annotation id {ann.get('id')} (image id {image_id}) in {self.ann_file} "
                        f"has category_id {cat_id!r}, which is not among the file's categories "
                        f"{sorted(self.cat_id_to_label)}; fix the annotation, " + FILE_SKIP_HINT
                    ),
                )
                continue
            if size is None:
                continue
            if ann.get("iscrowd", 0):
                counts["crowd_boxes_excluded"] += 1
                continue
            box = _xywh_to_clipped_xyxy(ann.get("bbox"), width, height, self.min_box_size)
            if isinstance(box, str):
                counts[f"{box}_count"] += 1
                counts[_OLD_BOX_KEYS[box]] += 1
                self.stats.add(
                    file_name, box, f"annotation id {ann.get('id')}: bbox {ann.get('bbox')!r}"
                )
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

    def _read(self, index: int) -> np.ndarray | None:
        """The pixels of item ``index``; ``None`` in skip mode when they cannot be used."""
        image_id = self.ids[index]
        path = self.image_path(index)
        where = f"image id {image_id} in {self.ann_file}"
        try:
            image = read_rgb(path)
        except FileNotFoundError as err:
            if self.on_error == "skip":
                self.stats.flag(index, "unreadable_when_read")
                return None
            raise MissingImageError(
                f"image file {path} ({where}) disappeared after the data set was scanned; "
                "restore it, " + FILE_SKIP_HINT
            ) from err
        except ImageReadError as err:
            if self.on_error == "skip":
                self.stats.flag(index, "unreadable_when_read")
                return None
            raise ImageReadError(
                f"{err} ({where}); its header passed the scan but its pixels cannot be decoded: "
                "replace or remove the file, " + FILE_SKIP_HINT
            ) from err
        if image.shape[:2] != self._sizes[image_id]:
            if self.on_error == "skip":
                self.stats.flag(index, "size_changed_when_read")
                return None
            raise ImageSizeMismatchError(
                f"image file {path} ({where}) is {image.shape[1]}x{image.shape[0]} (WxH) when "
                f"read but was {self._sizes[image_id][1]}x{self._sizes[image_id][0]} when the "
                "data set was scanned: it changed during the run; " + FILE_SKIP_HINT
            )
        return image

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, dict[str, Any]]:
        # key: an index, or (index, augmentation seed) from the resumable training sampler
        index, seed = split_key(key)
        reseed_transforms(self.transforms, seed)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        image = self._read(index)
        if image is None:  # skip mode, unusable when read: an empty item the collate drops
            height, width = self._sizes[self.ids[index]]
            empty = np.zeros((height, width, 3), dtype=np.uint8)
            image_t, target = self._make_item(index, empty, empty_target=True)
            target["skipped"] = True
            return SkippedSample((image_t, target))
        return self._make_item(index, image)

    def _make_item(
        self, index: int, image: np.ndarray, empty_target: bool = False
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        boxes, labels = self._targets[image_id]
        if empty_target:
            boxes, labels = boxes[:0], labels[:0]
        height, width = image.shape[:2]
        if self.transforms is not None:
            out = self.transforms(image=image, bboxes=boxes, labels=labels)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            boxes, labels = _inside(boxes, labels, image)
        target = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
            "image_id": int(image_id),
            "orig_size": (int(height), int(width)),
        }
        if self.uint8_images:
            return image_to_uint8_tensor(image), target
        return image_to_tensor(image), target

    def __repr__(self) -> str:
        return (
            f"CocoDetection(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"num_classes={self.num_classes}, label_map={self.label_map!r})"
        )


_OLD_BOX_KEYS = {
    "bad_box": "degenerate_boxes_dropped",
    "degenerate_box": "degenerate_boxes_dropped",
    "outside_box": "outside_boxes_dropped",
}


def _inside(
    boxes: np.ndarray, labels: np.ndarray, image: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes after a transform, clipped to its output image, finite and with area."""
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] in (1, 3):
        height, width = int(image.shape[-2]), int(image.shape[-1])
    else:
        height, width = int(image.shape[0]), int(image.shape[1])
    boxes = boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = np.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]


def _xywh_to_clipped_xyxy(
    bbox: Any, width: float, height: float, min_size: float
) -> tuple[list[float], bool] | str:
    """COCO ``[x, y, w, h]`` -> (xyxy clipped to the image, was it clipped), or the reason the
    box is dropped (``bad_box``, ``degenerate_box``, ``outside_box``)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return "bad_box"
    if not all(np.isfinite([x, y, w, h])):
        return "bad_box"
    if w <= 0 or h <= 0:
        return "degenerate_box"
    x0, y0, x1, y1 = x, y, x + w, y + h
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return "outside_box"
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
    if cx1 - cx0 < min_size or cy1 - cy0 < min_size:
        return "degenerate_box"
    return [cx0, cy0, cx1, cy1], clipped


class DetectionImageFolder(Dataset):
    """Images to predict on: items ``(image, {"image_id", "file_name", "orig_size"})``.

    Every file's header is read when the folder is built (see :class:`CocoDetection`).

    Args:
        folder: image folder.
        files: file names relative to ``folder`` (default: every image file in it, recursively,
            sorted).
        image_ids: ``file_name -> image id`` (e.g. COCO's ids, so predictions can be evaluated);
            default: the position in the sorted list.
        on_error: ``"raise"`` on a missing or unreadable image, or ``"skip"`` it: it is left out
            of the list (found by the scan) or of its batch (found when read), and listed in
            ``stats.problems``.
        scan_threads: threads of the header scan (``None``: ``min(32, 4 * CPUs)``).

    Raises:
        FileNotFoundError: the folder is missing or holds no images; (``on_error="raise"``) a
            listed file is missing.
        ImageReadError: (``on_error="raise"``) a file cannot be read.
    """

    def __init__(
        self,
        folder: str | Path,
        files: Sequence[str] | None = None,
        image_ids: dict[str, int] | None = None,
        on_error: str = "raise",
        scan_threads: int | None = None,
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
        self.image_ids = image_ids
        self.on_error = on_error
        self.stats = DatasetStats(f"DetectionImageFolder[{self.folder.name}]", "predict")
        self.stats.counts["images_listed"] = len(files)
        headers = read_headers([self.folder / f for f in files], threads=scan_threads)
        self.files: list[str] = []
        self._positions: list[int] = []
        self._sizes: list[tuple[int, int]] = []
        for position, (file_name, header) in enumerate(zip(files, headers, strict=True)):
            if isinstance(header, Exception):
                if on_error == "raise":
                    raise unreadable_file_error(header) from header
                reason = (
                    "missing_file" if isinstance(header, FileNotFoundError) else "unreadable_file"
                )
                self.stats.add(file_name, reason, str(header))
                continue
            self.files.append(file_name)
            self._positions.append(position)
            self._sizes.append((header.height, header.width))
        self.stats.counts["images_used"] = len(self.files)
        if not self.files:
            raise EmptySplitError(
                f"no readable image in {self.folder} ({len(files)} listed, all skipped)"
            )
        self.stats.set_items(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, dict[str, Any]]:
        # key: an index, or (index, seed) from the resumable sampler (no augmentation to reseed)
        index, _ = split_key(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        file_name = self.files[index]
        image_id = (
            self.image_ids[file_name] if self.image_ids is not None else self._positions[index]
        )
        try:
            image = read_rgb(self.folder / file_name)
        except (ImageReadError, FileNotFoundError):
            if self.on_error == "raise":
                raise
            self.stats.flag(index, "unreadable_when_read")
            height, width = self._sizes[index]
            meta = {
                "image_id": int(image_id),
                "file_name": file_name,
                "orig_size": (height, width),
                "skipped": True,
            }
            return SkippedSample((torch.zeros(3, height, width), meta))
        meta = {
            "image_id": int(image_id),
            "file_name": file_name,
            "orig_size": (int(image.shape[0]), int(image.shape[1])),
        }
        return image_to_tensor(image), meta
