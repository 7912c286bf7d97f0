"""Generated Cityscapes-format street scenes, so the LR-ASPP pipeline runs without Cityscapes.

The MobileNetV3 paper evaluates LR-ASPP on Cityscapes (§6.4, Tables 7-8), which cannot be
downloaded here. This module draws simple street scenes (sky, buildings, vegetation, a road in
perspective, sidewalks, cars and persons of varied sizes and colours, and void regions such as the
ego vehicle, out-of-roi border and unlabeled clutter) and writes them in the official layout:

``root/leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png`` and
``root/gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png`` (label IDS, as the
real ground truth; optionally also ``*_gtFine_labelTrainIds.png``).

Each class keeps one colour family and texture (noisy dark-grey road with lane marks, tiled pale
sidewalk, windowed beige/grey buildings, speckled green vegetation, smooth blue sky gradient,
cool-coloured cars with dark windows and wheels, warm-clothed persons with a skin-coloured head),
so a small network can learn them in minutes on a CPU, while per-pixel noise, blur, lighting
changes and occlusions keep the task from being trivial. Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mnv3det.data.cityscapes_labels import ID_TO_TRAINID, NAME_TO_LABEL

# Label ids (the ``id`` column of the official table), looked up by name so a typo fails loudly.
UNLABELED = NAME_TO_LABEL["unlabeled"].id  # 0
EGO_VEHICLE = NAME_TO_LABEL["ego vehicle"].id  # 1
OUT_OF_ROI = NAME_TO_LABEL["out of roi"].id  # 3
STATIC = NAME_TO_LABEL["static"].id  # 4
ROAD = NAME_TO_LABEL["road"].id  # 7
SIDEWALK = NAME_TO_LABEL["sidewalk"].id  # 8
BUILDING = NAME_TO_LABEL["building"].id  # 11
VEGETATION = NAME_TO_LABEL["vegetation"].id  # 21
SKY = NAME_TO_LABEL["sky"].id  # 23
PERSON = NAME_TO_LABEL["person"].id  # 24
CAR = NAME_TO_LABEL["car"].id  # 26

SCENE_LABEL_IDS: tuple[int, ...] = (ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, PERSON, CAR)
"""Label ids of the evaluated classes the generator draws."""

VOID_LABEL_IDS: tuple[int, ...] = (UNLABELED, EGO_VEHICLE, OUT_OF_ROI, STATIC)
"""Label ids of the ignored (void) regions the generator draws."""

DEFAULT_CITIES: tuple[str, ...] = ("aachen", "bremen", "zurich")


def _rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    # A stable per-image stream: crc32 of the names (Python's hash() is salted per process).
    key = "/".join(str(k) for k in keys)
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _jitter(rng: np.random.Generator, base: Sequence[int], spread: int) -> tuple[int, int, int]:
    c = np.asarray(base, dtype=np.int64) + rng.integers(-spread, spread + 1, size=3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


class _Canvas:
    """An RGB image and a label-id map drawn together, so labels match pixels exactly."""

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.image = Image.new("RGB", (width, height))
        self.label = Image.new("L", (width, height), UNLABELED)
        self.draw_image = ImageDraw.Draw(self.image)
        self.draw_label = ImageDraw.Draw(self.label)

    def polygon(self, points: list[tuple[float, float]], color, label_id: int) -> None:
        self.draw_image.polygon(points, fill=color)
        self.draw_label.polygon(points, fill=label_id)

    def rect(self, box: Sequence[float], color, label_id: int | None) -> None:
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            return
        self.draw_image.rectangle(box, fill=color)
        if label_id is not None:
            self.draw_label.rectangle(box, fill=label_id)

    def ellipse(self, box: Sequence[float], color, label_id: int | None) -> None:
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            return
        self.draw_image.ellipse(box, fill=color)
        if label_id is not None:
            self.draw_label.ellipse(box, fill=label_id)


def _draw_building(
    c: _Canvas, rng: np.random.Generator, x0: float, x1: float, top: float, base: float
) -> None:
    wall = _jitter(
        rng, rng.choice([(150, 140, 125), (120, 115, 110), (165, 150, 130), (135, 110, 95)]), 18
    )
    c.rect((x0, top, x1, base), wall, BUILDING)
    # Window grid: darker panes (still "building", as in Cityscapes' annotation).
    pane = _jitter(rng, (55, 65, 80), 15)
    win_w = max(2.0, (x1 - x0) * rng.uniform(0.08, 0.15))
    win_h = max(2.0, win_w * rng.uniform(0.9, 1.6))
    gap_x, gap_y = win_w * rng.uniform(0.6, 1.2), win_h * rng.uniform(0.6, 1.0)
    y = top + gap_y
    while y + win_h < base - gap_y:
        x = x0 + gap_x
        while x + win_w < x1 - gap_x * 0.5:
            c.rect((x, y, x + win_w, y + win_h), pane, None)
            x += win_w + gap_x
        y += win_h + gap_y


def _draw_tree(c: _Canvas, rng: np.random.Generator, cx: float, base: float, height: float) -> None:
    trunk_w = max(2.0, height * 0.06)
    c.rect(
        (cx - trunk_w / 2, base - height * 0.45, cx + trunk_w / 2, base),
        _jitter(rng, (80, 60, 40), 12),
        VEGETATION,
    )
    green = _jitter(rng, (70, 115, 40), 20)
    for _ in range(int(rng.integers(2, 5))):
        r = height * rng.uniform(0.22, 0.35)
        ox, oy = rng.uniform(-0.2, 0.2) * height, rng.uniform(-0.75, -0.5) * height
        c.ellipse(
            (cx + ox - r, base + oy - r, cx + ox + r, base + oy + r * 0.9),
            _jitter(rng, green, 12),
            VEGETATION,
        )


def _draw_car(c: _Canvas, rng: np.random.Generator, cx: float, bottom: float, width: float) -> None:
    body = _jitter(
        rng,
        rng.choice([(30, 60, 170), (20, 110, 140), (50, 50, 110), (150, 160, 190), (20, 30, 70)]),
        20,
    )
    height = width * rng.uniform(0.55, 0.7)
    x0, x1 = cx - width / 2, cx + width / 2
    y_body = bottom - height * 0.55
    # Cabin: trapezoid with dark windows.
    inset = width * rng.uniform(0.12, 0.2)
    c.polygon(
        [
            (x0 + inset, y_body),
            (x0 + inset * 1.6, bottom - height),
            (x1 - inset * 1.6, bottom - height),
            (x1 - inset, y_body),
        ],
        body,
        CAR,
    )
    win = _jitter(rng, (40, 50, 60), 10)
    c.polygon(
        [
            (x0 + inset * 1.25, y_body),
            (x0 + inset * 1.75, bottom - height * 0.9),
            (x1 - inset * 1.75, bottom - height * 0.9),
            (x1 - inset * 1.25, y_body),
        ],
        win,
        None,
    )
    c.rect((x0, y_body, x1, bottom - height * 0.12), body, CAR)
    # Lights and wheels (wheels are "car" in Cityscapes).
    light = max(1.0, width * 0.06)
    c.rect(
        (x0 + light * 0.5, y_body + light * 0.5, x0 + light * 1.7, y_body + light * 1.3),
        (235, 225, 180),
        None,
    )
    c.rect(
        (x1 - light * 1.7, y_body + light * 0.5, x1 - light * 0.5, y_body + light * 1.3),
        (235, 225, 180),
        None,
    )
    wr = width * 0.11
    for wx in (x0 + width * 0.2, x1 - width * 0.2):
        c.ellipse((wx - wr, bottom - wr * 1.6, wx + wr, bottom), (20, 20, 22), CAR)


def _draw_person(
    c: _Canvas, rng: np.random.Generator, cx: float, bottom: float, height: float
) -> None:
    shirt = _jitter(
        rng,
        rng.choice([(200, 40, 40), (220, 120, 30), (190, 40, 120), (230, 200, 40), (150, 60, 30)]),
        20,
    )
    legs = _jitter(rng, (45, 40, 55), 12)
    skin = _jitter(rng, (225, 180, 145), 20)
    w = height * rng.uniform(0.26, 0.34)
    head = height * 0.15
    leg_top = bottom - height * 0.45
    stride = w * rng.uniform(0.0, 0.25)
    c.polygon(
        [
            (cx - w * 0.35, leg_top),
            (cx - w * 0.35 - stride, bottom),
            (cx - w * 0.05, bottom),
            (cx, leg_top),
        ],
        legs,
        PERSON,
    )
    c.polygon(
        [
            (cx, leg_top),
            (cx + w * 0.05, bottom),
            (cx + w * 0.35 + stride, bottom),
            (cx + w * 0.35, leg_top),
        ],
        legs,
        PERSON,
    )
    c.ellipse(
        (cx - w / 2, bottom - height + head * 0.9, cx + w / 2, leg_top + w * 0.15), shirt, PERSON
    )
    c.ellipse(
        (cx - head / 2, bottom - height, cx + head / 2, bottom - height + head * 1.1), skin, PERSON
    )


def render_street_scene(
    rng: np.random.Generator, size: tuple[int, int] = (256, 512)
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one street scene.

    Args:
        rng: numpy random generator (the scene is a pure function of its state).
        size: ``(height, width)`` in pixels; at least 32x64.

    Returns:
        ``(image, label_ids)``: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` uint8 Cityscapes label ids.

    Raises:
        ValueError: ``size`` is too small to draw a scene.
    """
    h, w = int(size[0]), int(size[1])
    if h < 32 or w < 64:
        raise ValueError(f"size={size!r} is too small for a street scene; use at least (32, 64)")
    c = _Canvas(h, w)
    horizon = h * rng.uniform(0.38, 0.5)
    vx = w * rng.uniform(0.35, 0.65)

    # Sky: vertical gradient (drawn row by row below as an array for smoothness).
    sky_top, sky_low = (
        np.array(_jitter(rng, (75, 125, 200), 15)),
        np.array(_jitter(rng, (165, 200, 235), 12)),
    )
    c.rect((0, 0, w, horizon + 1), tuple(int(v) for v in sky_top), SKY)

    # Ground: sidewalk everywhere below the horizon, then the road in perspective on top of it.
    c.rect((0, horizon, w, h), _jitter(rng, (185, 165, 175), 12), SIDEWALK)
    half_left, half_right = w * rng.uniform(0.35, 0.6), w * rng.uniform(0.35, 0.6)
    road_pts = [
        (vx - w * 0.01, horizon),
        (vx + w * 0.01, horizon),
        (vx + half_right, h),
        (vx - half_left, h),
    ]
    c.polygon(road_pts, _jitter(rng, (85, 80, 90), 8), ROAD)

    # Buildings along the street: bases just below the horizon, tops at varied heights.
    x = -rng.uniform(0, 0.1) * w
    while x < w:
        bw = w * rng.uniform(0.1, 0.28)
        top = h * rng.uniform(0.03, 0.3)
        base = horizon + h * rng.uniform(0.0, 0.03)
        if rng.random() < 0.85:
            _draw_building(c, rng, x, x + bw, top, base)
        x += bw + (w * rng.uniform(0.0, 0.06) if rng.random() < 0.5 else 0.0)

    # Vegetation: hedges along the building line and trees standing on the sidewalk.
    for _ in range(int(rng.integers(0, 3))):
        hx = rng.uniform(0, w)
        hw = w * rng.uniform(0.08, 0.25)
        c.ellipse(
            (hx - hw / 2, horizon - h * 0.06, hx + hw / 2, horizon + h * 0.03),
            _jitter(rng, (60, 110, 45), 15),
            VEGETATION,
        )

    def row_scale(y: float) -> float:  # object size grows linearly below the horizon
        return max(0.05, (y - horizon) / (h - horizon))

    objects: list[tuple[float, str, float]] = []  # (bottom y, kind, x)
    for _ in range(int(rng.integers(1, 4))):
        y = horizon + (h - horizon) * rng.uniform(0.05, 0.55)
        side = rng.choice([-1, 1])
        road_half = half_left if side < 0 else half_right
        x_edge = vx + side * road_half * row_scale(y)
        objects.append((y, "tree", x_edge + side * w * rng.uniform(0.02, 0.15) * row_scale(y)))
    for _ in range(int(rng.integers(1, 5))):
        y = horizon + (h - horizon) * rng.uniform(0.1, 0.85)
        s = row_scale(y)
        x = vx + rng.uniform(-half_left, half_right) * s * 0.8
        objects.append((y, "car", x))
    for _ in range(int(rng.integers(1, 5))):
        y = horizon + (h - horizon) * rng.uniform(0.1, 0.9)
        s = row_scale(y)
        side = rng.choice([-1, 1])
        road_half = half_left if side < 0 else half_right
        on_road = rng.random() < 0.25
        offset = (
            rng.uniform(-0.7, 0.7) * road_half
            if on_road
            else side * road_half * rng.uniform(1.05, 1.6)
        )
        objects.append((y, "person", vx + offset * s))
    if rng.random() < 0.5:  # unlabeled clutter ("static": bins, boxes) on a sidewalk
        y = horizon + (h - horizon) * rng.uniform(0.2, 0.7)
        objects.append((y, "static", vx + rng.choice([-1, 1]) * half_left * row_scale(y) * 1.3))

    # Painter's order: far (small y) first, so near objects occlude far ones.
    for y, kind, x in sorted(objects, key=lambda o: o[0]):
        s = row_scale(y)
        if kind == "tree":
            _draw_tree(c, rng, x, y, h * rng.uniform(0.45, 0.8) * (0.35 + s))
        elif kind == "car":
            _draw_car(c, rng, x, y, w * rng.uniform(0.22, 0.32) * s)
        elif kind == "person":
            _draw_person(c, rng, x, y, h * rng.uniform(0.35, 0.5) * (0.2 + s))
        else:
            bw = w * 0.04 * (0.3 + s)
            c.rect((x - bw, y - bw * 1.5, x + bw, y), _jitter(rng, (110, 90, 60), 25), STATIC)

    # Lane marks: dashed line down the middle of the road (road pixels in Cityscapes).
    mark = _jitter(rng, (215, 215, 205), 10)
    n_dash = 8
    for i in range(n_dash):
        t0, t1 = (i + 0.3) / n_dash, (i + 0.8) / n_dash
        y0, y1 = horizon + (h - horizon) * t0**1.5, horizon + (h - horizon) * t1**1.5
        x_mid = vx + (half_right - half_left) / 2 * ((y0 + y1) / 2 - horizon) / (h - horizon)
        hw0, hw1 = 0.006 * w * row_scale(y0), 0.006 * w * row_scale(y1)
        c.draw_image.polygon(
            [(x_mid - hw0, y0), (x_mid + hw0, y0), (x_mid + hw1, y1), (x_mid - hw1, y1)], fill=mark
        )

    # Ego vehicle hood at the bottom (void), in about half of the scenes.
    if rng.random() < 0.5:
        hood = h * rng.uniform(0.06, 0.12)
        c.ellipse(
            (-0.2 * w, h - hood, 1.2 * w, h + hood * 1.5),
            _jitter(rng, (40, 40, 45), 10),
            EGO_VEHICLE,
        )

    image = np.asarray(c.image.filter(ImageFilter.GaussianBlur(radius=0.6)), dtype=np.float32)
    label = np.asarray(c.label, dtype=np.uint8).copy()

    # Class textures (vectorised per class mask).
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    sky = label == SKY
    t = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
    gradient = sky_top * (1 - t) + sky_low * t
    image[sky] = np.broadcast_to(gradient, (h, w, 3))[sky]
    veg = label == VEGETATION
    image[veg] *= rng.uniform(0.65, 1.3, size=(int(veg.sum()), 1)).astype(np.float32)
    road = label == ROAD
    image[road] += rng.normal(0, 7, size=(int(road.sum()), 1)).astype(np.float32)
    side = label == SIDEWALK
    tile = max(3.0, w / 48)
    grout = ((xx % tile) < 1) | ((yy % (tile * 0.7)) < 1)
    image[side & grout] *= 0.8

    # Lighting and sensor noise for the whole frame, then the out-of-roi border.
    image = image * rng.uniform(0.8, 1.15) + rng.uniform(-12, 12)
    image += rng.normal(0, 5, size=image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    border = int(rng.integers(0, max(2, h // 64) + 1))
    if border > 0:
        label[:border, :] = OUT_OF_ROI
        label[-border:, :] = OUT_OF_ROI
        label[:, :border] = OUT_OF_ROI
        label[:, -border:] = OUT_OF_ROI
        image[label == OUT_OF_ROI] = 0
    return image, label


def generate_street_scenes(
    root: str | Path,
    cities: Sequence[str] = DEFAULT_CITIES,
    per_city: int = 4,
    size: tuple[int, int] = (256, 512),
    splits: Sequence[str] = ("train", "val"),
    seed: int = 0,
    write_train_ids: bool = False,
) -> Path:
    """Write a Cityscapes-format data set of generated street scenes.

    Files follow the official layout, e.g.
    ``root/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png`` with
    ``root/gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png`` (label ids). Different
    splits get different scenes (the random stream is keyed by split, city and index).

    Args:
        root: output folder (created).
        cities: city folder names used in every split.
        per_city: scenes per city and split.
        size: ``(height, width)`` of every image.
        splits: split folders to write.
        seed: the data set is a pure function of this seed and the other arguments.
        write_train_ids: also write ``*_gtFine_labelTrainIds.png`` (ids mapped to train ids,
            255 ignored), as cityscapesScripts' ``createTrainIdLabelImgs`` does.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: no cities or splits, ``per_city < 1``, or a city name with characters that
            break the ``{city}_{seq}_{frame}`` file names.
    """
    if per_city < 1:
        raise ValueError(f"per_city must be >= 1, got {per_city}")
    if not cities or not splits:
        raise ValueError(
            f"need at least one city and one split, got cities={cities!r}, splits={splits!r}"
        )
    for city in cities:
        if not city or "_" in city or "/" in city:
            raise ValueError(
                f"city name {city!r} must be non-empty without '_' or '/' (it is part of the file names)"
            )
    root = Path(root)
    for split in splits:
        for city in cities:
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            for index in range(per_city):
                rng = _rng_for(seed, split, city, index)
                image, label = render_street_scene(rng, size)
                stem = f"{city}_{index:06d}_{19:06d}"
                Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png", compress_level=1)
                Image.fromarray(label).save(gt_dir / f"{stem}_gtFine_labelIds.png")
                if write_train_ids:
                    Image.fromarray(ID_TO_TRAINID[label]).save(
                        gt_dir / f"{stem}_gtFine_labelTrainIds.png"
                    )
    return root
