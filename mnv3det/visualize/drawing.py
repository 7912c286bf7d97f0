"""Boxes with legible labels, segmentation colours, legends and sheets (one home for all drawing).

Detection pictures draw the boxes with ``torchvision.utils.draw_bounding_boxes`` and the labels
with PIL: ``"class score"`` in a readable font on a filled background of the box colour (black or
white text, whichever contrasts), above the box when there is room, else inside it, always kept
inside the image; labels that would cover an earlier (higher-scoring) label move to the next free
spot. Small images are enlarged first (``min_side``) so that a 160-px validation image still gets
readable text; on sheets, large ones are shrunk (``max_side``) so that a sheet stays a few MB.

Sheets put several pictures on one canvas with column titles and a colour legend:

* :func:`detection_sheet`: ``ground truth | prediction`` pairs, the legend names the classes
  shown and the score threshold;
* :func:`segmentation_sheet`: ``image | ground truth | prediction | overlay`` rows; ground truth
  and prediction are both plain colour masks (ignored pixels in black), the overlay blends the
  prediction with the photo; the legend names every class shown.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes

__all__ = [
    "DETECTION_PALETTE",
    "class_color",
    "color_mask",
    "compose_sheet",
    "detection_sheet",
    "draw_boxes",
    "draw_detections",
    "get_font",
    "legend",
    "overlay",
    "segmentation_sheet",
    "to_pil",
]

Color = tuple[int, int, int]

DETECTION_PALETTE: tuple[Color, ...] = (
    (230, 25, 75), (60, 180, 75), (255, 200, 20), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 220, 220), (240, 50, 230), (170, 210, 40), (250, 150, 190),
    (0, 128, 128), (190, 150, 255), (170, 110, 40), (128, 0, 0), (100, 230, 150),
    (128, 128, 0), (255, 170, 120), (0, 0, 128), (128, 128, 128), (30, 30, 30),
)  # fmt: skip
"""Box colour of label ``k``: ``DETECTION_PALETTE[k % 20]`` (distinct, bright colours)."""

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)


def class_color(label: int) -> Color:
    """The box colour of a detection label."""
    return DETECTION_PALETTE[int(label) % len(DETECTION_PALETTE)]


@functools.lru_cache(maxsize=16)
def get_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A sans-serif font of ``size`` pixels: Pillow's built-in one, else matplotlib's DejaVu Sans,
    else Pillow's fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        pass
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


def _text_size(text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return math.ceil(right - min(left, 0)), math.ceil(bottom - min(top, 0))


def _text_color(fill: Color) -> Color:
    """Black on light fills, white on dark ones (ITU-R BT.601 luma)."""
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return BLACK if luma > 150 else WHITE


def to_pil(image: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from a ``(3, H, W)`` tensor (``[0, 1]`` float or uint8), an
    ``(H, W, 3)`` / ``(H, W)`` uint8 array or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert("RGB")


def _resize(
    image: Image.Image, min_side: int, resample: int, max_side: int = 0
) -> tuple[Image.Image, float]:
    """``image`` scaled so that its short side is at least ``min_side`` and its long side at
    most ``max_side`` (the limit wins; 0 = none); returns the picture and the scale factor."""
    factor = max(1.0, min_side / min(image.size)) if min_side > 0 else 1.0
    if max_side > 0:
        factor = min(factor, max_side / max(image.size))
    if factor == 1.0:
        return image, 1.0
    size = (round(image.width * factor), round(image.height * factor))
    return image.resize(size, resample), factor


def _label_spot(
    size: tuple[int, int], box: Sequence[float], image_size: tuple[int, int], placed: list
) -> tuple[int, int]:
    """Top-left corner for a ``size`` label of ``box``: above it, else inside its top, below
    it, inside its bottom; clamped into the image; the first one that covers no placed label,
    else the one covering least."""
    w, h = size
    width, height = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    candidates = [(x1, y1 - h), (x1, y1), (x1, y2), (x1, y2 - h), (x2 - w, y1 - h)]
    best, best_overlap = None, None
    for cx, cy in candidates:
        x = int(min(max(cx, 0), max(width - w, 0)))
        y = int(min(max(cy, 0), max(height - h, 0)))
        overlap = sum(
            max(0, min(x + w, px + pw) - max(x, px)) * max(0, min(y + h, py + ph) - max(y, py))
            for px, py, pw, ph in placed
        )
        if best_overlap is None or overlap < best_overlap:
            best, best_overlap = (x, y), overlap
        if overlap == 0:
            break
    return best


def draw_boxes(
    image: torch.Tensor | np.ndarray | Image.Image,
    boxes: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[int] | torch.Tensor,
    scores: Sequence[float] | torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    score_thresh: float = 0.0,
    min_side: int = 0,
    width: int | None = None,
    font_size: int | None = None,
    max_side: int = 0,
) -> Image.Image:
    """Draw boxes in their class colour, each with a ``"class score"`` label on a filled background.

    Args:
        image: the picture (see :func:`to_pil`).
        boxes: ``(N, 4)`` xyxy boxes in the pixels of ``image``.
        labels: ``N`` class indices (colour and name).
        scores: ``N`` scores, shown after the name; ``None`` for ground truth (name only).
        class_names: name of each class index (the index itself when missing).
        score_thresh: boxes scoring less are left out.
        min_side: enlarge the image first so that its short side is at least this (boxes follow).
        width: line width (default: grows with the image, at least 2).
        font_size: label text height (default: grows with the image, 12 to 22 pixels).
        max_side: shrink the image first so that its long side is at most this (0: never).

    Returns:
        The RGB picture (resized when ``min_side`` / ``max_side`` asked for it).
    """
    picture, factor = _resize(to_pil(image), min_side, Image.BICUBIC, max_side)
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4) * factor
    labels_l = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    scores_l = None if scores is None else [float(v) for v in torch.as_tensor(scores).reshape(-1)]
    keep = [i for i in range(len(labels_l)) if scores_l is None or scores_l[i] >= score_thresh]
    if scores_l is not None:  # the best detections get their labels placed first
        keep.sort(key=lambda i: -scores_l[i])
    if not keep:
        return picture
    short = min(picture.size)
    width = width or max(2, round(short / 180))
    font = get_font(font_size or max(12, min(22, round(short / 24))))
    colors = [class_color(labels_l[i]) for i in keep]
    drawn = draw_bounding_boxes(
        torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous(),
        boxes_t[keep],
        colors=colors,
        width=width,
    )
    picture = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    placed: list[tuple[int, int, int, int]] = []
    pad = max(1, font.size // 6) if hasattr(font, "size") else 2
    for i, color in zip(keep, colors, strict=True):
        label = labels_l[i]
        name = class_names[label] if class_names is not None and label < len(class_names) else label
        text = f"{name}" if scores_l is None else f"{name} {scores_l[i]:.2f}"
        tw, th = _text_size(text, font)
        size = (tw + 2 * pad, th + 2 * pad)
        x, y = _label_spot(size, boxes_t[i].tolist(), picture.size, placed)
        placed.append((x, y, *size))
        draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), fill=color)
        left, top, _, _ = font.getbbox(text)
        draw.text(
            (x + pad - min(left, 0), y + pad - min(top, 0)),
            text,
            fill=_text_color(color),
            font=font,
        )
    return picture


def _note(picture: Image.Image, text: str) -> None:
    """Write ``text`` in the top-left corner of ``picture`` (in place), white on dark grey."""
    font = get_font(max(12, min(22, round(min(picture.size) / 24))))
    w, h = _text_size(text, font)
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 0, w + 8, h + 8), fill=(60, 60, 60))
    left, top, _, _ = font.getbbox(text)
    draw.text((4 - min(left, 0), 4 - min(top, 0)), text, fill=WHITE, font=font)


def draw_detections(
    image: torch.Tensor,
    detections: Mapping[str, torch.Tensor],
    class_names: Sequence[str] | None = None,
    score_thresh: float = 0.3,
    width: int | None = None,
) -> torch.Tensor:
    """:func:`draw_boxes` for one model output ``{"boxes", "labels", "scores"}``.

    Returns:
        ``(3, H, W)`` uint8 picture at the image's own size (``torchvision.io.write_png`` input).
    """
    picture = draw_boxes(
        image,
        detections["boxes"].detach().cpu(),
        detections["labels"].detach().cpu(),
        detections.get("scores"),
        class_names,
        score_thresh=score_thresh,
        width=width,
    )
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()


def color_mask(
    mask: np.ndarray | torch.Tensor, palette: np.ndarray | Sequence[Color]
) -> np.ndarray:
    """``(H, W, 3)`` uint8 colours of a class mask; values outside the palette (255) are black."""
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(np.int64)
    colors = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors)] = colors[:256]
    return lut[np.clip(mask, 0, 255)] * ((mask >= 0) & (mask < len(colors)))[..., None]


def overlay(image: np.ndarray, color_mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image (both ``uint8 [H, W, 3]``; resized to the mask)."""
    if image.shape[:2] != color_mask.shape[:2]:
        size = (color_mask.shape[1], color_mask.shape[0])
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    blended = (1 - alpha) * image.astype(np.float32) + alpha * color_mask.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def legend(
    entries: Sequence[tuple[str, Color]],
    width: int,
    title: str | None = None,
    font_size: int = 16,
) -> Image.Image:
    """A white strip with a colour swatch and a name per entry, wrapped to ``width`` pixels.

    Args:
        entries: ``(name, (r, g, b))`` pairs; long names are shortened to fit one line.
        width: strip width.
        title: text before the first entry (e.g. ``"classes:"``).
        font_size: text height.
    """
    font = get_font(font_size)
    pad, swatch, gap = 8, font_size, font_size
    items: list[tuple[str | None, Color | None]] = [(title, None)] if title else []
    items += [(str(name), tuple(int(c) for c in color)) for name, color in entries]
    usable = max(width - 2 * pad, swatch * 4)
    cells = []
    for text, color in items:
        extra = swatch + 6 if color is not None else 0
        while _text_size(text, font)[0] + extra > usable and len(text) > 2:
            text = text[: max(1, len(text) - 4)] + "..."
        cells.append((text, color, _text_size(text, font)[0] + extra))
    line_h = font_size + 8
    lines, x = [[]], 0
    for cell in cells:
        if x and x + cell[2] > usable:
            lines.append([])
            x = 0
        lines[-1].append((x, cell))
        x += cell[2] + gap
    strip = Image.new("RGB", (width, 2 * pad + line_h * len(lines)), WHITE)
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        y = pad + row * line_h
        for x, (text, color, _) in line:
            x += pad
            if color is not None:
                top = y + (line_h - swatch) // 2
                draw.rectangle((x, top, x + swatch, top + swatch), fill=color, outline=(90, 90, 90))
                x += swatch + 6
            draw.text((x, y + (line_h - font_size) // 2 - 1), text, fill=BLACK, font=font)
    return strip


def compose_sheet(
    rows: Sequence[Sequence[Image.Image]],
    column_titles: Sequence[str] | None = None,
    title: str | None = None,
    legend_entries: Sequence[tuple[str, Color]] | None = None,
    legend_title: str | None = None,
    gutter: int = 6,
) -> Image.Image:
    """Lay pictures out in a grid on white, with a title, column titles and a legend below.

    Args:
        rows: the pictures, row by row (cells of a column are centred in its widest one).
        column_titles: one title per column, written above the first row.
        title: a line above everything.
        legend_entries: ``(name, colour)`` pairs for :func:`legend`.
        legend_title: the legend's first word(s).
        gutter: white space between cells.
    """
    ncols = max(len(r) for r in rows)
    col_w = [max((r[c].width for r in rows if c < len(r)), default=0) for c in range(ncols)]
    row_h = [max(cell.height for cell in r) for r in rows]
    grid_w = sum(col_w) + gutter * (ncols + 1)
    font_size = 18
    font = get_font(font_size)
    head = []
    if title:
        head.append(("title", font_size + 14))
    if column_titles:
        head.append(("columns", font_size + 10))
    head_h = sum(h for _, h in head)
    strip = (
        legend(legend_entries, grid_w, legend_title) if legend_entries else Image.new("RGB", (1, 0))
    )
    grid_h = sum(row_h) + gutter * (len(rows) + 1)
    sheet = Image.new("RGB", (grid_w, head_h + grid_h + strip.height), WHITE)
    draw = ImageDraw.Draw(sheet)
    y = 0
    for kind, h in head:
        if kind == "title":
            draw.text((gutter + 2, y + 7), title, fill=BLACK, font=font)
        else:
            x = gutter
            for c, text in enumerate(column_titles[:ncols]):
                tw, _ = _text_size(text, font)
                draw.text((x + max(0, (col_w[c] - tw) // 2), y + 4), text, fill=BLACK, font=font)
                x += col_w[c] + gutter
        y += h
    y += gutter
    for r, cells in enumerate(rows):
        x = gutter
        for c, cell in enumerate(cells):
            sheet.paste(cell, (x + (col_w[c] - cell.width) // 2, y + (row_h[r] - cell.height) // 2))
            x += col_w[c] + gutter
        y += row_h[r] + gutter
    if strip.height:
        sheet.paste(strip, (0, y))
    return sheet


def detection_sheet(
    samples: Sequence[tuple[Any, Mapping[str, Any], Mapping[str, Any]]],
    class_names: Sequence[str] | None = None,
    score_thresh: float = 0.3,
    pairs_per_row: int = 2,
    min_side: int = 320,
    title: str | None = None,
    max_side: int = 640,
) -> Image.Image:
    """Ground truth beside prediction for each image, with column titles and a class legend.

    Args:
        samples: ``(image, target, detections)`` per image: ``target`` with ``boxes`` (xyxy,
            the image's pixels) and ``labels``; ``detections`` also with ``scores``.
        class_names: name of each label.
        score_thresh: detections scoring less are not drawn (the legend says so).
        pairs_per_row: ``ground truth | prediction`` pairs side by side in a row.
        min_side: small images are enlarged to this short side, for readable labels.
        max_side: large images are shrunk to this long side (keeps the sheet's size sane).
        title: a line above the sheet (default names the score threshold).

    Returns:
        The sheet, ``2 * pairs_per_row`` columns wide (fewer with fewer images).
    """
    if not samples:
        raise ValueError("detection_sheet: no images to draw")
    cells, shown = [], set()
    for image, target, dets in samples:
        scores = torch.as_tensor(dets["scores"]).reshape(-1)
        det_labels = torch.as_tensor(dets["labels"]).reshape(-1)
        gt_labels = torch.as_tensor(target["labels"]).reshape(-1)
        shown.update(gt_labels.tolist())
        shown.update(det_labels[scores >= score_thresh].tolist())
        sizes = {"min_side": min_side, "max_side": max_side}
        gt = draw_boxes(image, target["boxes"], gt_labels, None, class_names, **sizes)
        pred = draw_boxes(
            image, dets["boxes"], det_labels, scores, class_names, score_thresh, **sizes
        )
        if len(gt_labels) == 0:
            _note(gt, "no objects")
        if not bool((scores >= score_thresh).any()):
            _note(pred, "no detections")
        cells.append((gt, pred))
    per_row = max(1, min(pairs_per_row, len(cells)))
    rows = [
        [p for pair in cells[i : i + per_row] for p in pair] for i in range(0, len(cells), per_row)
    ]
    entries = [
        (
            class_names[k] if class_names is not None and k < len(class_names) else str(k),
            class_color(k),
        )
        for k in sorted(shown)
    ]
    return compose_sheet(
        rows,
        ["ground truth", f"prediction (score >= {score_thresh:.2f})"] * per_row,
        title=title,
        legend_entries=entries or [("no objects", WHITE)],
        legend_title="classes:",
    )


def segmentation_sheet(
    samples: Sequence[tuple[Any, Any, Any]],
    class_names: Sequence[str],
    palette: np.ndarray | Sequence[Color],
    ignore_index: int = 255,
    alpha: float = 0.6,
    min_side: int = 192,
    title: str | None = None,
    max_side: int = 512,
) -> Image.Image:
    """``image | ground truth | prediction | overlay`` rows with column titles and a legend.

    Ground truth and prediction are drawn alike (plain class colours, ignored pixels black); the
    overlay column blends the prediction with the photo.

    Args:
        samples: ``(image, ground-truth mask, predicted mask)`` per image; masks ``(H, W)`` of
            class indices (``ignore_index`` where not labelled).
        class_names: name of each class.
        palette: colour of each class, ``(C, 3)``.
        ignore_index: the unlabelled value (legend entry "ignored" when present).
        alpha: overlay opacity of the prediction colours.
        min_side: small images are enlarged to this short side (nearest neighbour for masks).
        max_side: large images are shrunk to this long side (a 2048-px Cityscapes frame: 512).
        title: a line above the sheet.
    """
    if not samples:
        raise ValueError("segmentation_sheet: no images to draw")
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    rows, shown, ignored = [], set(), False
    for image, gt, pred in samples:
        photo = np.asarray(to_pil(image))
        gt = np.asarray(gt.cpu() if isinstance(gt, torch.Tensor) else gt).astype(np.int64)
        pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(np.int64)
        h, w = gt.shape
        if photo.shape[:2] != (h, w):
            photo = np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
        pred = pred[:h, :w]
        shown.update(np.unique(gt[gt != ignore_index]).tolist())
        shown.update(np.unique(pred).tolist())
        ignored = ignored or bool((gt == ignore_index).any())
        gt_rgb, pred_rgb = color_mask(gt, palette), color_mask(pred, palette)
        pictures = [photo, gt_rgb, pred_rgb, overlay(photo, pred_rgb, alpha)]
        row = []
        for k, pic in enumerate(pictures):
            resample = Image.BICUBIC if k in (0, 3) else Image.NEAREST
            row.append(_resize(Image.fromarray(pic), min_side, resample, max_side)[0])
        rows.append(row)
    entries = [
        (class_names[k] if k < len(class_names) else str(k), tuple(palette[k].tolist()))
        for k in sorted(shown)
        if 0 <= k < len(palette)
    ]
    if ignored:
        entries.append(("ignored", BLACK))
    return compose_sheet(
        rows,
        ["image", "ground truth", "prediction", "overlay (prediction)"],
        title=title,
        legend_entries=entries,
        legend_title="classes:",
    )
