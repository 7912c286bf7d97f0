"""The one image reader of mnv3det: training, validation, prediction and int8 calibration.

:func:`read_rgb` turns every file PIL can open into an upright ``(H, W, 3)`` uint8 RGB array:

* 1-bit, 8-bit grayscale and palette files are expanded to RGB;
* 16-bit and 32-bit grayscale (PIL modes ``I;16``, ``I;16B``, ``I;16L``, ``I``) are scaled to 8
  bits by the file's bit depth (``value * 255 / (2**bits - 1)``), not clipped at 255 (which turns
  a 16-bit PNG white); float images (``F``) in [0, 1] are scaled by 255, others clipped;
* RGBA, LA, PA and palette files with transparency are composited on black, so transparent pixels
  get a deterministic colour;
* CMYK (also Adobe's inverted CMYK JPEGs) and YCbCr are converted by PIL;
* the EXIF orientation (1-8) is applied (``PIL.ImageOps.exif_transpose``), so a phone photo
  stored sideways comes out upright, as annotation tools show it;
* the format is decided by the file's content, not its extension (a PNG named ``.jpg`` is read
  as the PNG it is).

:func:`read_header` reads only the header of a file (PIL opens files lazily): its format and
its upright size after the EXIF orientation, without decoding pixels. It also looks at the last
bytes of JPEG and PNG files for their end marker; a file without one is decoded once to tell a
truncated file from one with trailing bytes. The data sets use it to check a whole split before
training (``tools/scan_speed.py`` measures it).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageHeader",
    "ImageReadError",
    "read_header",
    "read_headers",
    "read_label_png",
    "read_rgb",
]

EXIF_ORIENTATION = 0x0112
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TAIL_BYTES = 64


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded (the message names the file)."""


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says.

    Attributes:
        path: the file.
        format: PIL's format name from the content (``"JPEG"``, ``"PNG"``, ...).
        mode: PIL mode of the stored pixels.
        width: upright width (after the EXIF orientation).
        height: upright height.
        orientation: EXIF orientation (1 when there is none).
    """

    path: Path
    format: str
    mode: str
    width: int
    height: int
    orientation: int

    @property
    def stored_size(self) -> tuple[int, int]:
        """``(height, width)`` of the pixels as stored, before the EXIF orientation."""
        if self.orientation in (5, 6, 7, 8):
            return self.width, self.height
        return self.height, self.width


def _orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # PIL would decode the whole PNG to look for an eXIf chunk after the pixels
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block: PIL's exif_transpose ignores it too
        return 1
    return value if 1 <= value <= 8 else 1


def _tail_ok(path: Path, image_format: str | None) -> bool:
    """Whether a JPEG / PNG file ends with its end marker (other formats: not checked)."""
    if image_format not in ("JPEG", "PNG", "MPO"):
        return True
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
    if image_format == "PNG":
        return tail.endswith(_PNG_END)
    return b"\xff\xd9" in tail


@contextlib.contextmanager
def _open_image(path: Path, what: str = "image") -> Iterator[Image.Image]:
    """``Image.open`` with this module's errors, the one place every reader opens a file.

    A missing file raises ``FileNotFoundError``; a file PIL cannot read (while opening or while
    the caller decodes it inside the ``with``) raises :class:`ImageReadError` naming it.
    Decompression-bomb *warnings* are silenced (large images are legitimate data); PIL's
    error for absurd sizes is still an :class:`ImageReadError`.

    Args:
        path: the file.
        what: the word for it in messages (``"image"``, ``"label"``).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except (*_READ_ERRORS, Image.DecompressionBombError) as err:
        message = _describe(path, err)
        if what != "image":
            message = message.replace("image", f"{what} image", 1)
        raise ImageReadError(message) from err


def _describe(path: Path, err: BaseException) -> str:
    if path.is_file() and path.stat().st_size == 0:
        return f"cannot read image {path}: the file is empty (0 bytes)"
    text = str(err) or type(err).__name__
    if "truncated" in text.lower():
        return f"cannot read image {path}: the file is truncated ({text})"
    return f"cannot read image {path}: {text}"


def read_header(path: str | Path) -> ImageHeader:
    """Read the format and upright size of an image file without decoding its pixels.

    JPEG and PNG files must end with their end marker; one that does not is decoded once, so a
    truncated file is reported here rather than when training reads it.

    Args:
        path: image file.

    Returns:
        The :class:`ImageHeader`.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file is empty, not an image PIL knows, or truncated (names the file).
    """
    path = Path(path)
    with _open_image(path) as image:
        orientation = _orientation(image)
        # stored size (PIL's TIFF reader reports the size after the orientation)
        width, height = getattr(image, "_tile_size", None) or image.size
        if not _tail_ok(path, image.format):
            image.load()  # truncated, or trailing bytes after the end marker?
        header = ImageHeader(path, str(image.format), image.mode, width, height, orientation)
    if orientation in (5, 6, 7, 8):
        header = ImageHeader(path, header.format, header.mode, height, width, orientation)
    if header.width < 1 or header.height < 1:
        raise ImageReadError(f"cannot read image {path}: it has no pixels ({width}x{height})")
    return header


def _bit_depth(image: Image.Image, array: np.ndarray) -> int:
    """Bits per sample of a 16/32-bit grayscale image, from the file when it says so."""
    if image.mode.startswith("I;16"):
        return 16
    bits = None
    tags = getattr(image, "tag_v2", None)  # TIFF BitsPerSample
    if tags is not None and 258 in tags:
        value = tags[258]
        bits = int(value[0] if isinstance(value, tuple) else value)
    elif image.format == "PNG":
        bits = 16  # PNG stores grayscale wider than 8 bits only as 16 bits
    if bits is None or bits <= 8 or bits > 32:
        peak = int(array.max()) if array.size else 0
        bits = 8 if peak < 256 else 16 if peak < 65536 else 32
    return bits


def _to_8bit(image: Image.Image) -> Image.Image:
    """An ``I;16*`` / ``I`` / ``F`` image as ``L``, scaled by its bit depth (not clipped)."""
    array = np.asarray(image)
    if image.mode == "F":
        array = array.astype(np.float64)
        finite = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        out = np.clip(np.rint(finite * scale), 0, 255)
    else:
        bits = _bit_depth(image, array)
        out = np.rint(np.clip(array.astype(np.float64), 0, None) * (255.0 / (2**bits - 1)))
        out = np.clip(out, 0, 255)
    return Image.fromarray(out.astype(np.uint8))


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an upright ``(H, W, 3)`` uint8 RGB array (see the module docstring).

    Args:
        path: image file.

    Returns:
        The pixels, C-contiguous.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file is not a readable image (names the file).
    """
    with _open_image(Path(path)) as image:
        image.load()
        # In place, and convert() only when needed: both otherwise return a copy of the
        # decoded image, which cost as much as the JPEG decoding itself (1.8 -> 1.3 ms for a
        # 640x480 COCO image, measured; the pixels are the same).
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            image = _to_8bit(image)
        has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info
        )
        if has_alpha:
            # Composite on black rather than dropping alpha with convert("RGB") on an
            # undefined background: transparent pixels get a deterministic colour.
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.array(image, dtype=np.uint8)


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a single-channel label PNG (Cityscapes ``*_labelIds.png``) as an ``(H, W)`` array.

    Label values are not scaled: a 16-bit label file keeps its values (callers check them).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file cannot be decoded or has more than one channel.
    """
    path = Path(path)
    with _open_image(path, what="label") as image:
        array = np.asarray(image)
    if array.ndim != 2:
        raise ImageReadError(
            f"label image {path} has shape {array.shape}; expected a single-channel (L or P "
            "mode) PNG of label ids"
        )
    return array.copy()


def read_headers(
    paths: Sequence[str | Path], threads: int | None = None
) -> list[ImageHeader | FileNotFoundError | ImageReadError]:
    """:func:`read_header` of many files, in a thread pool (the work is mostly waiting on I/O).

    Args:
        paths: image files.
        threads: pool size (default ``min(32, 4 * CPUs)``; 0 or 1: no pool).

    Returns:
        Per file, in order, its header or the error reading it raised.
    """
    if threads is None:
        threads = min(32, 4 * (os.cpu_count() or 1))

    def one(path: str | Path) -> ImageHeader | FileNotFoundError | ImageReadError:
        try:
            return read_header(path)
        except (FileNotFoundError, ImageReadError) as err:
            return err

    if threads <= 1 or len(paths) < 64:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, paths, chunksize=64))
