"""A generated COCO-format detection data set of simple shapes, for the demo and the tests.

Nobody needs COCO on disk to see SSDLite (paper §6.3) learn: :func:`generate_shapes_coco` writes
``root/train2017/``, ``root/val2017/`` and ``root/annotations/instances_{split}.json`` in the
official COCO layout and format, so exactly the same reader, metric and CLI run on it as on COCO.

What the data exercises:

* four shape classes with **non-contiguous** category ids (circle 1, square 3, triangle 7,
  cross 12), so the contiguous label mapping of :class:`mnv3det.data.coco.CocoDetection` is used;
* shapes of 15-50 % of the image side (default; matched to SSDLite's default boxes), random
  colours kept at a clear luminance distance from the background, backgrounds that are
  flat-with-noise, linear gradients or blotchy low-frequency noise;
* overlapping shapes (later shapes occlude earlier ones; the overlap is bounded, as intersection
  over the smaller box, so every object stays mostly visible), some images with no objects at
  all, and a few ``iscrowd=1`` annotations (a cluster of small same-class shapes with one RLE
  mask), as COCO has;
* polygon segmentations for ordinary objects, so ``area`` is the polygon area as in COCO.

Everything is drawn with numpy/PIL and is deterministic in ``seed``: image ``i`` of a split is
drawn from its own ``numpy`` generator seeded with ``(seed, split, i)``, so adding images does not
change the earlier ones, and the validation split does not depend on ``num_train``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

#: (category id, name) of the generated classes. Ids are deliberately not 1..K.
SHAPE_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "circle"),
    (3, "square"),
    (7, "triangle"),
    (12, "cross"),
)

_SPLIT_INDEX = {"train2017": 0, "val2017": 1}
_FORMAT_VERSION = 2  # bump when the drawing changes, so cached data sets are regenerated


def _as_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        height = width = image_size
    else:
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or (H, W); got {image_size!r}")
        height, width = (int(v) for v in image_size)
    if height < 32 or width < 32:
        raise ValueError(f"image_size must be at least 32x32 pixels; got {(height, width)}")
    return height, width


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float (H, W, 3) background in [0, 255]: flat + noise, a linear gradient, or blotches."""
    kind = rng.integers(3)
    if kind == 0:  # flat colour with pixel noise
        base = rng.uniform(0, 255, size=3)
        image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    elif kind == 1:  # linear gradient between two colours in a random direction
        c0, c1 = rng.uniform(0, 255, size=(2, 3))
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xx * math.cos(angle) / width + yy * math.sin(angle) / height
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = c0 + (c1 - c0) * t[..., None]
    else:  # low-frequency colour blotches: a coarse random grid upsampled bilinearly
        coarse = rng.uniform(0, 255, size=(rng.integers(2, 6), rng.integers(2, 6), 3))
        blotch = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)
        image = np.asarray(blotch, dtype=np.float32)
        # pull the colours together a bit so shapes of any colour can still stand out
        image = image.mean(axis=(0, 1)) + 0.5 * (image - image.mean(axis=(0, 1)))
    noise = rng.normal(0, rng.uniform(0, 12), size=(height, width, 3))
    return np.clip(image + noise, 0, 255).astype(np.float32)


def _shape_polygon(
    name: str, cx: float, cy: float, size: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """Vertices of a shape whose bounding box is about ``size`` x ``size`` around (cx, cy)."""
    r = size / 2
    if name == "circle":
        # an ellipse with a mild aspect ratio, 40 vertices: round enough at these sizes
        ry = r * rng.uniform(0.85, 1.0)
        return [
            (cx + r * math.cos(a), cy + ry * math.sin(a))
            for a in np.linspace(0, 2 * math.pi, 40, endpoint=False)
        ]
    if name == "square":  # axis-aligned, mild aspect ratio
        ry = r * rng.uniform(0.8, 1.0)
        return [(cx - r, cy - ry), (cx + r, cy - ry), (cx + r, cy + ry), (cx - r, cy + ry)]
    if name == "triangle":  # pointing up or down, apex jittered sideways
        apex = cx + rng.uniform(-0.3, 0.3) * r
        sign = 1 if rng.random() < 0.75 else -1
        return [(apex, cy - sign * r), (cx + r, cy + sign * r), (cx - r, cy + sign * r)]
    if name == "cross":  # a plus sign with arms of 30-40 % of its size
        a = r * rng.uniform(0.3, 0.4)
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {name!r}")


def _polygon_area(points: list[tuple[float, float]]) -> float:
    xy = np.asarray(points, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _covered_fraction(a: list[float], b: list[float]) -> float:
    """Intersection of two xyxy boxes over the area of the smaller one (unlike IoU, this is
    large when a big shape would hide a small one completely)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def _contrasting_colour(rng: np.random.Generator, background_lum: float) -> tuple[int, int, int]:
    """A saturated random colour whose luminance differs from the background's by >= 70."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if abs(float(_luminance(colour)) - background_lum) >= 70:
            break
    else:  # fall back to black or white, whichever is further away
        colour = np.zeros(3) if background_lum > 127 else np.full(3, 255.0)
    return tuple(int(c) for c in colour)  # type: ignore[return-value]


def _rle_uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major run lengths starting with a run of zeros), the
    format the official ``iscrowd=1`` annotations use."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _draw_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    max_objects: int,
    empty_fraction: float,
    crowd_fraction: float,
    min_size: float,
    max_size: float,
    max_overlap: float,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image; returns the uint8 RGB array and its annotations (no ids yet)."""
    background = _background(rng, height, width)
    canvas = Image.fromarray(background.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    side = min(height, width)
    annotations: list[dict[str, Any]] = []
    if rng.random() < empty_fraction:
        return np.asarray(canvas), annotations

    boxes: list[list[float]] = []
    num_objects = int(rng.integers(1, max_objects + 1))
    for _ in range(num_objects):
        for _attempt in range(20):
            size = side * rng.uniform(min_size, max_size)
            cx = rng.uniform(size / 2, width - size / 2)
            cy = rng.uniform(size / 2, height - size / 2)
            cat_index = int(rng.integers(len(SHAPE_CATEGORIES)))
            cat_id, name = SHAPE_CATEGORIES[cat_index]
            poly = _shape_polygon(name, cx, cy, size, rng)
            xs = [p[0] for p in poly]
            ys = [p[1] for p in poly]
            box = [max(min(xs), 0.0), max(min(ys), 0.0), min(max(xs), width), min(max(ys), height)]
            # Bounded overlap: occlusion happens, but no object is hidden beyond recognition.
            if all(_covered_fraction(box, other) <= max_overlap for other in boxes):
                break
        else:
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        patch_lum = float(_luminance(background[y0 : y1 + 1, x0 : x1 + 1]).mean())
        fill = _contrasting_colour(rng, patch_lum)
        draw.polygon(poly, fill=fill)
        boxes.append(box)
        annotations.append(
            {
                "category_id": cat_id,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "area": _polygon_area(poly),
                "iscrowd": 0,
                "segmentation": [[round(float(v), 2) for p in poly for v in p]],
            }
        )

    if rng.random() < crowd_fraction:
        # A crowd: a tight cluster of small same-class shapes annotated once with iscrowd=1,
        # as COCO does for e.g. a crowd of people. Detectors must not train on it; COCOeval
        # ignores detections that fall on it.
        cat_id, name = SHAPE_CATEGORIES[int(rng.integers(len(SHAPE_CATEGORIES)))]
        region = side * rng.uniform(0.25, 0.35)
        rx = rng.uniform(0, width - region)
        ry = rng.uniform(0, height - region)
        mask_image = Image.new("L", (width, height), 0)
        mask_draw = ImageDraw.Draw(mask_image)
        fill = _contrasting_colour(rng, float(_luminance(background).mean()))
        for _ in range(int(rng.integers(4, 8))):
            size = region * rng.uniform(0.25, 0.4)
            cx = rx + rng.uniform(size / 2, region - size / 2)
            cy = ry + rng.uniform(size / 2, region - size / 2)
            poly = _shape_polygon(name, cx, cy, size, rng)
            draw.polygon(poly, fill=fill)
            mask_draw.polygon(poly, fill=1)
        mask = np.asarray(mask_image, dtype=np.uint8)
        ys, xs = np.nonzero(mask)
        if xs.size:
            x0, y0, x1, y1 = (
                float(xs.min()),
                float(ys.min()),
                float(xs.max() + 1),
                float(ys.max() + 1),
            )
            annotations.append(
                {
                    "category_id": cat_id,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(mask.sum()),
                    "iscrowd": 1,
                    "segmentation": _rle_uncompressed(mask),
                }
            )
    return np.asarray(canvas), annotations


def generate_shapes_coco(
    root: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    image_size: int | tuple[int, int] = 256,
    seed: int = 0,
    *,
    max_objects: int = 4,
    empty_fraction: float = 0.08,
    crowd_fraction: float = 0.04,
    min_size: float = 0.15,
    max_size: float = 0.5,
    max_overlap: float = 0.35,
    image_format: str = "jpg",
    overwrite: bool = False,
) -> Path:
    """Write a COCO-format data set of simple shapes to ``root``.

    Layout (the official one)::

        root/train2017/000000000001.jpg ...
        root/val2017/000001000001.jpg ...
        root/annotations/instances_train2017.json
        root/annotations/instances_val2017.json

    Args:
        root: output folder (created).
        num_train: images in ``train2017``.
        num_val: images in ``val2017``.
        image_size: ``H`` = ``W`` as an int, or ``(H, W)``.
        seed: everything is deterministic in it.
        max_objects: at most this many ordinary objects per image (at least 1 in a non-empty one).
        empty_fraction: probability that an image has no objects at all (a negative).
        crowd_fraction: probability that an image also gets one ``iscrowd=1`` cluster.
        min_size: smallest object side as a fraction of the shorter image side. The default
            0.15 keeps every object matchable by SSDLite's smallest default box (0.2 of the
            side: IoU >= 0.5 down to ~0.15); smaller objects get only their forced best match.
        max_size: largest object side as a fraction of the shorter image side.
        max_overlap: largest overlap allowed between two objects of one image, as the
            intersection over the smaller box's area (so no object is hidden behind another).
        image_format: ``"jpg"`` (quality 95) or ``"png"``.
        overwrite: regenerate even if ``root`` already holds a data set made with the same
            arguments (otherwise that one is reused and nothing is written).

    Returns:
        ``Path(root)``.
    """
    height, width = _as_hw(image_size)
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0; got {num_train}, {num_val}")
    if not 0 < min_size <= max_size <= 1:
        raise ValueError(f"need 0 < min_size <= max_size <= 1; got {min_size}, {max_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1; got {max_objects}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png'; got {image_format!r}")
    root = Path(root)
    params = {
        "generator": "mnv3det.data.synthetic_coco.generate_shapes_coco",
        "format_version": _FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": [height, width],
        "seed": seed,
        "max_objects": max_objects,
        "empty_fraction": empty_fraction,
        "crowd_fraction": crowd_fraction,
        "min_size": min_size,
        "max_size": max_size,
        "max_overlap": max_overlap,
        "image_format": image_format,
    }
    splits = {"train2017": num_train, "val2017": num_val}
    if not overwrite and _matches_existing(root, params, splits):
        return root

    categories = [
        {"id": cat_id, "name": name, "supercategory": "shape"} for cat_id, name in SHAPE_CATEGORIES
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, count in splits.items():
        split_dir = root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        split_index = _SPLIT_INDEX[split]
        # COCO image ids are unique across splits; keep that property.
        first_id = 1 if split_index == 0 else max(num_train, 1_000_000) + 1
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            pixels, anns = _draw_image(
                rng,
                height,
                width,
                max_objects=max_objects,
                empty_fraction=empty_fraction,
                crowd_fraction=crowd_fraction,
                min_size=min_size,
                max_size=max_size,
                max_overlap=max_overlap,
            )
            image_id = first_id + i
            file_name = f"{image_id:012d}.{image_format}"
            save_kwargs = {"quality": 95} if image_format == "jpg" else {}
            Image.fromarray(pixels).save(split_dir / file_name, **save_kwargs)
            images.append(
                {"id": image_id, "file_name": file_name, "height": height, "width": width}
            )
            for ann in anns:
                ann.update({"id": ann_id, "image_id": image_id})
                ann["bbox"] = [round(float(v), 2) for v in ann["bbox"]]
                ann["area"] = round(float(ann["area"]), 2)
                annotations.append(ann)
                ann_id += 1
        document = {
            "info": {"description": "mnv3det generated shapes", **params, "split": split},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(document, f)
    return root


def _matches_existing(root: Path, params: dict[str, Any], splits: dict[str, int]) -> bool:
    """True if ``root`` holds a complete data set generated with exactly ``params``."""
    for split, count in splits.items():
        ann_file = root / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            return False
        try:
            with open(ann_file) as f:
                info = json.load(f).get("info", {})
        except (OSError, ValueError):
            return False
        if {k: info.get(k) for k in params} != params:
            return False
        if sum(1 for _ in (root / split).glob(f"*.{params['image_format']}")) != count:
            return False
    return True
