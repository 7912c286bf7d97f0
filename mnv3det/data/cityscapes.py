"""Cityscapes semantic segmentation reader (the LR-ASPP data set of the paper, §6.4).

Reads the official layout::

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png        (label ids 0..33)
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png   (optional, train ids)

Label ids are mapped to the 19 train ids with everything else 255 (ignored), exactly as
cityscapesScripts' table defines (:mod:`mnv3det.data.cityscapes_labels`). Ready-made
``*_labelTrainIds.png`` files (from ``createTrainIdLabelImgs``) are accepted too.

Every pair is checked when the data set is built, before training (a thread pool reads each
image's header and decodes each label file): a missing or unreadable image or label file, an image
and label of different sizes (after the image's EXIF orientation), or a label value that is not a
Cityscapes id (or train id). With ``on_error="raise"`` (default) the first is an error naming the
files and the fix (with the number of the others); with ``on_error="skip"`` the pairs are removed
from the index before sampling and listed per file in ``stats.problems`` (the data module writes
``skipped.csv`` and prints a summary at the end of the run). A pair that passed the check but
cannot be read later (changed during the run) is an error, or in skip mode an empty
:class:`~mnv3det.data.problems.SkippedSample` (all-ignore mask, zero loss) that
:func:`collate_segmentation` leaves out of the batch, listed once.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from mnv3det.data.cityscapes_labels import (
    ID_TO_TRAINID,
    IGNORE_INDEX,
    NUM_CLASSES,
    VALID_LABEL_IDS,
)
from mnv3det.data.image_io import (
    ImageHeader,
    ImageReadError,
    read_header,
    read_headers,
    read_label_png,
    read_rgb,
)
from mnv3det.data.problems import (
    DatasetStats,
    SkippedSample,
    drop_skipped,
    unreadable_file_error,
)
from mnv3det.data.sampling import SampleKey, reseed_transforms, split_key

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIXES = {"labelIds": "_gtFine_labelIds.png", "labelTrainIds": "_gtFine_labelTrainIds.png"}
LabelType = Literal["auto", "labelIds", "labelTrainIds"]

EXPECTED_LAYOUT = (
    "expected the official Cityscapes layout: ROOT/leftImg8bit/{split}/{city}/*_leftImg8bit.png "
    "with ROOT/gtFine/{split}/{city}/*_gtFine_labelIds.png (or *_gtFine_labelTrainIds.png)"
)

_VALID_ID_LUT = np.zeros(256, dtype=bool)
_VALID_ID_LUT[sorted(VALID_LABEL_IDS)] = True
_VALID_TRAINID_LUT = np.zeros(256, dtype=bool)
_VALID_TRAINID_LUT[:NUM_CLASSES] = True
_VALID_TRAINID_LUT[IGNORE_INDEX] = True


class CityscapesDataError(ValueError):
    """A Cityscapes image/label pair is inconsistent (size mismatch, unknown label value)."""


class CityscapesLabelNotFoundError(FileNotFoundError):
    """An image has no matching ``gtFine`` label file."""


SKIP_HINT = "or set on_error='skip' (data.on_error: skip) to leave the pair out and list it"


def _map_threads(function: Callable[[Any], Any], items: Sequence[Any], threads: int | None) -> list:
    """``[function(item) for item in items]`` in a thread pool (PIL decodes without the GIL)."""
    if threads is None:
        threads = min(32, 4 * (os.cpu_count() or 1))
    if threads <= 1 or len(items) < 8:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(function, items))


def _unknown_values(values: np.ndarray, valid_lut: np.ndarray) -> list[int]:
    uniq = np.unique(values)
    return [int(v) for v in uniq if v < 0 or v > 255 or not valid_lut[int(v)]]


def label_ids_to_train_ids(label: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """Map a Cityscapes label-id array to train ids (0..18, 255 ignored).

    Args:
        label: ``(H, W)`` integer array of label ids (0..33).
        path: file the array came from, for the error message.

    Returns:
        ``(H, W)`` uint8 train ids.

    Raises:
        CityscapesDataError: a value is not a Cityscapes label id.
    """
    bad = _unknown_values(label, _VALID_ID_LUT)
    if bad:
        raise CityscapesDataError(
            f"label file {path} contains values {bad} that are not Cityscapes label ids (0..33). "
            "If the file holds train ids (0..18, 255), name it *_gtFine_labelTrainIds.png or pass "
            "label_type='labelTrainIds'."
        )
    return ID_TO_TRAINID[label.astype(np.intp)]


def check_train_ids(label: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """Validate a train-id array (0..18 or 255) and return it as uint8.

    Raises:
        CityscapesDataError: a value is neither a train id 0..18 nor 255.
    """
    bad = _unknown_values(label, _VALID_TRAINID_LUT)
    if bad:
        raise CityscapesDataError(
            f"label file {path} contains values {bad} that are not Cityscapes train ids "
            f"(0..{NUM_CLASSES - 1}, or {IGNORE_INDEX} for ignore). If the file holds label ids "
            "(0..33), use the *_gtFine_labelIds.png file or label_type='labelIds'."
        )
    return label.astype(np.uint8)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``FloatTensor[3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


class CityscapesSegmentation(Dataset):
    """Cityscapes (or a generated data set in the same layout) for semantic segmentation.

    Each item is ``(image, mask)``: ``image`` a ``FloatTensor[3, H, W]`` in [0, 1] (RGB, not
    normalised; the model normalises), ``mask`` a ``LongTensor[H, W]`` of train ids 0..18 with
    255 for ignored pixels.

    Args:
        root: data set folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: split folder name (``train``, ``val``, ``test``, ...).
        transforms: albumentations-style callable ``transforms(image=HWC uint8, mask=HW uint8)
            -> {"image": ..., "mask": ...}`` applied before conversion to tensors (see
            :mod:`mnv3det.data.segmentation_transforms`). ``None``: no transform.
        label_type: ``"labelIds"`` reads ``*_gtFine_labelIds.png`` and maps ids to train ids;
            ``"labelTrainIds"`` reads ready ``*_gtFine_labelTrainIds.png``; ``"auto"`` uses the
            train-id file where one exists, else the label-id file.
        label_dir: annotation folder name (``gtFine``; ``gtCoarse`` works the same way).
        on_error: ``"raise"`` on the first bad pair (see the module docstring) or ``"skip"``
            bad pairs (left out of the index and listed in ``stats.problems``).
        scan_threads: threads of the check at construction (``None``: ``min(32, 4 * CPUs)``).

    Attributes:
        files: list of ``(image_path, label_path)`` pairs, sorted (the usable ones).
        label_types: ``"labelIds"`` or ``"labelTrainIds"`` for each entry of ``files``.
        stats: what was left out, per file (:class:`~mnv3det.data.problems.DatasetStats`).

    Raises:
        FileNotFoundError: the split folder is missing or holds no ``*_leftImg8bit.png`` images
            (names the path and the expected layout).
        CityscapesLabelNotFoundError: (``on_error="raise"``) an image has no label file (names the
            expected file).
        CityscapesDataError: (``on_error="raise"``) a size mismatch or unknown label value, or no
            usable pair is left.
        ImageReadError: (``on_error="raise"``) an image or label file cannot be read.
        ValueError: unknown ``label_type`` / ``on_error``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Callable[..., dict[str, Any]] | None = None,
        label_type: LabelType = "auto",
        label_dir: str = "gtFine",
        on_error: str = "raise",
        scan_threads: int | None = None,
    ) -> None:
        if label_type not in ("auto", "labelIds", "labelTrainIds"):
            raise ValueError(
                f"label_type must be 'auto', 'labelIds' or 'labelTrainIds', got {label_type!r}"
            )
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.label_type = label_type
        self.on_error = on_error
        image_dir = self.root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(
                f"Cityscapes split folder not found: {image_dir}; {EXPECTED_LAYOUT}"
            )
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise FileNotFoundError(
                f"no *{IMAGE_SUFFIX} images in {image_dir}/<city>/; {EXPECTED_LAYOUT}"
            )
        self.stats = DatasetStats(f"CityscapesSegmentation[{split}]", split)
        self.stats.counts["images_listed"] = len(images)
        errors: list[Exception] = []
        label_root = self.root / label_dir / split
        suffix_ids = LABEL_SUFFIXES["labelIds"].replace("gtFine", label_dir)
        suffix_train = LABEL_SUFFIXES["labelTrainIds"].replace("gtFine", label_dir)
        candidates: list[tuple[Path, Path, str]] = []
        for image_path in images:
            stem = image_path.name[: -len(IMAGE_SUFFIX)]
            city_dir = label_root / image_path.parent.name
            train_path, ids_path = (
                city_dir / f"{stem}{suffix_train}",
                city_dir / f"{stem}{suffix_ids}",
            )
            if label_type == "labelTrainIds" or (label_type == "auto" and train_path.is_file()):
                chosen, kind = train_path, "labelTrainIds"
            else:
                chosen, kind = ids_path, "labelIds"
            if not chosen.is_file():
                wanted = f"{ids_path} or {train_path}" if label_type == "auto" else str(chosen)
                self.stats.add(image_path, "missing_label", f"expected {wanted}")
                errors.append(
                    CityscapesLabelNotFoundError(
                        f"label file for image {image_path} not found: expected {wanted}; "
                        f"{EXPECTED_LAYOUT}; restore it, " + SKIP_HINT
                    )
                )
                continue
            candidates.append((image_path, chosen, kind))
        checked = _map_threads(self._check_pair, candidates, scan_threads)
        self.files: list[tuple[Path, Path]] = []
        self.label_types: list[str] = []
        self._sizes: list[tuple[int, int]] = []
        self._class_counts = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
        for (image_path, label_path, kind), result in zip(candidates, checked, strict=True):
            if not isinstance(result[0], str):
                self.files.append((image_path, label_path))
                self.label_types.append(kind)
                self._sizes.append(result[0])
                self._class_counts += result[1]
                continue
            reason, err = result
            self.stats.add(image_path, reason, str(err))
            errors.append(err)
        self.stats.counts["images_used"] = len(self.files)
        if errors and on_error == "raise":
            first = errors[0]
            if len(errors) > 1:
                kinds = Counter(row.reason for row in self.stats.problems)
                more = ", ".join(f"{n} {reason}" for reason, n in sorted(kinds.items()))
                note = f" [{len(errors)} bad pairs in {image_dir}: {more}]"
                first.args = (str(first.args[0]) + note, *first.args[1:])
            raise first
        if not self.files:
            raise CityscapesDataError(
                f"no usable image/label pair in {image_dir} ({len(images)} images, every one "
                "left out: see the errors with on_error='raise'); fix the data or the paths"
            )
        self.stats.set_items([pair[0] for pair in self.files])

    def _check_pair(
        self, candidate: tuple[Path, Path, str]
    ) -> tuple[tuple[int, int], np.ndarray] | tuple[str, Exception]:
        """``((H, W), class pixel counts)`` of a good pair, else ``(reason, error)``."""
        image_path, label_path, kind = candidate
        try:
            header: ImageHeader = read_header(image_path)
        except (FileNotFoundError, ImageReadError) as err:
            return "unreadable_file", ImageReadError(f"{err}; replace the file, " + SKIP_HINT)
        try:
            raw = read_label_png(label_path)
        except (FileNotFoundError, ImageReadError) as err:
            return "unreadable_label", ImageReadError(f"{err}; replace the file, " + SKIP_HINT)
        if raw.shape != (header.height, header.width):
            return "label_size_mismatch", CityscapesDataError(
                f"image {image_path} is {header.height}x{header.width} (HxW) but its label "
                f"{label_path} is {raw.shape[0]}x{raw.shape[1]}; they must be the same size; "
                "replace the mismatched file, " + SKIP_HINT
            )
        try:
            mask = (
                label_ids_to_train_ids(raw, label_path)
                if kind == "labelIds"
                else check_train_ids(raw, label_path)
            )
        except CityscapesDataError as err:
            return "unknown_label_ids", CityscapesDataError(f"{err} Or {SKIP_HINT}.")
        hist = np.bincount(mask.ravel(), minlength=256)
        counts = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
        counts[:NUM_CLASSES] = hist[:NUM_CLASSES]
        counts[NUM_CLASSES] = hist[IGNORE_INDEX]
        return (header.height, header.width), counts

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one pair without transforms: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` uint8 train ids.

        Raises:
            CityscapesDataError: size mismatch or unknown label value (names the files).
            ImageReadError: a file cannot be decoded (names it).
        """
        image_path, label_path = self.files[index]
        image = read_rgb(image_path)
        raw = read_label_png(label_path)
        if raw.shape != image.shape[:2]:
            raise CityscapesDataError(
                f"image {image_path} is {image.shape[0]}x{image.shape[1]} (HxW) but its label "
                f"{label_path} is {raw.shape[0]}x{raw.shape[1]}; they must be the same size"
            )
        if self.label_types[index] == "labelIds":
            mask = label_ids_to_train_ids(raw, label_path)
        else:
            mask = check_train_ids(raw, label_path)
        return image, mask

    def scan(self) -> np.ndarray:
        """Pixel counts of each train id over the usable pairs (counted by the check at
        construction, which reads every label file and the header of every image).

        Returns:
            ``int64`` array of 20 counts: train ids 0..18, then ignored (255) pixels. Classes
            present in the split are ``np.flatnonzero(counts[:19])``.
        """
        return self._class_counts.copy()

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        # key: an index, or (index, augmentation seed) from the resumable training sampler
        index, seed = split_key(key)
        reseed_transforms(self.transforms, seed)
        skipped = False
        try:
            image, mask = self.load(index)
        except (FileNotFoundError, ImageReadError, CityscapesDataError):
            if self.on_error == "raise":
                raise
            # skip mode, changed since the check: an empty item that collate leaves out
            self.stats.flag(index, "unreadable_when_read")
            height, width = self._sizes[index]
            image = np.zeros((height, width, 3), dtype=np.uint8)
            mask = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
            skipped = True
        if self.transforms is not None:
            out = self.transforms(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        if isinstance(image, torch.Tensor):  # a pipeline ending in ToTensorV2
            image_t = image.float().div(255.0) if image.dtype == torch.uint8 else image.float()
        else:
            image_t = image_to_tensor(image)
        mask_t = torch.as_tensor(np.asarray(mask), dtype=torch.long)
        if skipped:
            return SkippedSample((image_t, mask_t))
        return image_t, mask_t

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"images={len(self)}, label_type={self.label_type!r})"
        )


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class SegmentationImageFolder(Dataset):
    """Images to predict on: items ``(image, {"file_name", "orig_size", "input_size"})``.

    ``image`` is a ``FloatTensor[3, H, W]`` in [0, 1] (after the optional resize);
    ``file_name`` is the path relative to ``folder`` (so outputs can mirror the folder tree),
    ``orig_size`` the ``(H, W)`` of the file and ``input_size`` the ``(H, W)`` of ``image``.

    Args:
        folder: image folder, searched recursively (e.g. ``ROOT/leftImg8bit/test``).
        resize: optional ``(height, width)`` to resize every image to (bilinear).
        on_error: ``"raise"`` on a missing or unreadable image, or ``"skip"`` it (left out of the
            list when the header scan finds it, of its batch when found on reading; listed in
            ``stats.problems``).
        scan_threads: threads of the header scan (``None``: ``min(32, 4 * CPUs)``).

    Raises:
        FileNotFoundError: the folder is missing or holds no images.
        ImageReadError: (``on_error="raise"``) a file cannot be read.
    """

    def __init__(
        self,
        folder: str | Path,
        resize: tuple[int, int] | None = None,
        on_error: str = "raise",
        scan_threads: int | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.folder = Path(folder)
        self.on_error = on_error
        if not self.folder.is_dir():
            raise FileNotFoundError(f"prediction image folder not found: {self.folder}")
        files = sorted(
            str(p.relative_to(self.folder))
            for p in self.folder.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise FileNotFoundError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {self.folder} or its subfolders"
            )
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))
        self.stats = DatasetStats(f"SegmentationImageFolder[{self.folder.name}]", "predict")
        self.stats.counts["images_listed"] = len(files)
        headers = read_headers([self.folder / f for f in files], threads=scan_threads)
        self.files: list[str] = []
        self._sizes: list[tuple[int, int]] = []
        for file_name, header in zip(files, headers, strict=True):
            if isinstance(header, Exception):
                if on_error == "raise":
                    raise unreadable_file_error(header) from header
                self.stats.add(file_name, "unreadable_file", str(header))
                continue
            self.files.append(file_name)
            self._sizes.append((header.height, header.width))
        self.stats.counts["images_used"] = len(self.files)
        if not self.files:
            raise CityscapesDataError(f"no readable image in {self.folder} (all skipped)")
        self.stats.set_items(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        file_name = self.files[index]
        try:
            image = read_rgb(self.folder / file_name)
            skipped = False
        except (FileNotFoundError, ImageReadError):
            if self.on_error == "raise":
                raise
            self.stats.flag(index, "unreadable_when_read")
            image = np.zeros((*self._sizes[index], 3), dtype=np.uint8)
            skipped = True
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        if self.resize is not None and self.resize != orig_size:
            image = cv2.resize(
                image, (self.resize[1], self.resize[0]), interpolation=cv2.INTER_LINEAR
            )
        meta = {
            "file_name": file_name,
            "orig_size": orig_size,
            "input_size": (int(image.shape[0]), int(image.shape[1])),
        }
        if skipped:
            return SkippedSample((image_to_tensor(image), {**meta, "skipped": True}))
        return image_to_tensor(image), meta


def collate_segmentation(
    batch: list[tuple[torch.Tensor, Any]],
) -> tuple[torch.Tensor, Any]:
    """Stack ``(image, target)`` items; images of different sizes are padded at the bottom/right.

    Images are padded with 0; ``LongTensor`` masks with 255 (ignored by loss and mIoU), so a
    batch of mixed-size validation images evaluates exactly like one image at a time. Any other
    target (prediction metadata dicts) is returned as a list; their ``input_size`` tells the
    unpadded extent.

    Returns:
        ``(images [N, 3, Hmax, Wmax], masks [N, Hmax, Wmax] or list of targets)``.
    """
    batch = drop_skipped(batch)
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    if all(isinstance(t, torch.Tensor) for t in targets):
        masks = targets[0].new_full((len(targets), h, w), IGNORE_INDEX)
        for i, m in enumerate(targets):
            masks[i, : m.shape[-2], : m.shape[-1]] = m
        return out, masks
    return out, targets
