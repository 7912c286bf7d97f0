"""Reading images as correct RGB, shared by the COCO and Cityscapes readers.

Grayscale, palette, RGBA and CMYK files become 3-channel RGB; EXIF orientation is applied
(``PIL.ImageOps.exif_transpose``), so a phone photo stored sideways comes out upright, as
annotation tools show it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    Args:
        path: image file.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file is not a readable image (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                # Composite on black rather than dropping alpha with convert("RGB") on an
                # undefined background: transparent pixels get a deterministic colour.
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (0, 0, 0, 255))
                image = Image.alpha_composite(background, image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a single-channel label PNG (Cityscapes ``*_labelIds.png``) as an ``(H, W)`` array.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file cannot be decoded or has more than one channel.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(f"cannot read label image {path}: {err}") from err
    if array.ndim != 2:
        raise ImageReadError(
            f"label image {path} has shape {array.shape}; expected a single-channel (L or P "
            "mode) PNG of label ids"
        )
    return array.copy()
