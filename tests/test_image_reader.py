"""The one image reader (``read_rgb``) and the header scan (``read_header``): every image mode PIL
opens comes out with the right pixels and orientation, the format is decided by the content, and
broken files (empty, truncated, not an image) are errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnv3det.data.image_io import ImageReadError, read_header, read_headers, read_rgb

# A 6 (H) x 8 (W) picture whose every pixel differs, so any flip / rotation shows.
UPRIGHT = (np.arange(6 * 8 * 3).reshape(6, 8, 3) * 5 % 256).astype(np.uint8)


def stored_for(orientation: int, upright: np.ndarray) -> np.ndarray:
    """The pixels a camera stores with EXIF ``orientation`` for the upright picture (the
    EXIF 2.3 definition: how the stored 0th row / column map to the visual top / left)."""
    return {
        1: lambda a: a,
        2: np.fliplr,  # mirrored horizontally
        3: lambda a: np.rot90(a, 2),
        4: np.flipud,
        5: lambda a: np.transpose(a, (1, 0, 2)),  # mirrored + rotated: the transpose
        6: lambda a: np.rot90(a, 1),  # the viewer rotates 90° clockwise
        7: lambda a: np.rot90(np.transpose(a, (1, 0, 2)), 2),  # the transverse
        8: lambda a: np.rot90(a, -1),  # the viewer rotates 90° counter-clockwise
    }[orientation](upright)


def save_with_orientation(path: Path, orientation: int, fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.fromarray(np.ascontiguousarray(stored_for(orientation, UPRIGHT)))
    extra = {"lossless": True} if fmt == "WEBP" else {}
    image.save(path, format=fmt, exif=exif, **extra)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_every_exif_orientation_comes_out_upright(tmp_path, orientation, fmt) -> None:
    path = tmp_path / "photo.jpg"  # a misleading extension on purpose: content decides
    save_with_orientation(path, orientation, fmt)
    np.testing.assert_array_equal(read_rgb(path), UPRIGHT)
    header = read_header(path)
    assert (header.height, header.width) == (6, 8)
    assert header.format == fmt


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_jpeg(tmp_path, orientation) -> None:
    big = np.kron(UPRIGHT, np.ones((8, 8, 1), dtype=np.uint8))  # 8x8 blocks survive JPEG
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = {1: big}.get(orientation)
    stored = np.ascontiguousarray(stored_for(orientation, big)) if stored is None else stored
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, quality=100, subsampling=0, exif=exif)
    image = read_rgb(path).astype(int)
    assert image.shape == big.shape
    assert np.abs(image - big).mean() < 3
    assert (read_header(path).height, read_header(path).width) == big.shape[:2]


def test_grayscale_1_8_16_bit_and_32_bit(tmp_path) -> None:
    Image.fromarray(np.array([[0, 1]], dtype=bool)).save(tmp_path / "one.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "one.png")[0, :, 0], [0, 255])
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8)).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "l.png")[0], [[0] * 3, [77] * 3, [255] * 3])
    # 16-bit PNG (PIL mode I;16): scaled by 255/65535, not clipped at 255 (all white)
    values16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = read_rgb(tmp_path / "g16.png")
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])
    assert (rgb[..., 0] == rgb[..., 2]).all()
    # big-endian 16-bit (I;16B) from raw bytes
    big_endian = Image.frombytes("I;16B", (4, 1), values16.astype(">u2").tobytes())
    big_endian.save(tmp_path / "g16b.tif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "g16b.tif")[0, :, 0], [0, 1, 128, 255])
    # 32-bit integer TIFF (mode I): scaled by its bit depth (32), 2**31 - 1 is half the range
    Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32)).save(tmp_path / "g32.tif")
    assert Image.open(tmp_path / "g32.tif").mode == "I"
    np.testing.assert_array_equal(read_rgb(tmp_path / "g32.tif")[0, :, 0], [0, 64, 127])


def test_palette_alpha_and_cmyk(tmp_path) -> None:
    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(
        read_rgb(tmp_path / "p.png")[0, :2], [[10, 20, 30], [200, 100, 0]]
    )
    palette.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent -> black
    np.testing.assert_array_equal(read_rgb(tmp_path / "pt.png")[0, :2], [[0, 0, 0], [200, 100, 0]])
    palette.save(tmp_path / "p.gif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "p.gif")[0, 1], [200, 100, 0])
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 255))
    rgba.putpixel((1, 0), (200, 100, 50, 0))
    rgba.save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png")[0], [[200, 100, 50], [0, 0, 0]])
    Image.new("LA", (1, 1), (100, 128)).save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "la.png")[0, 0], [50, 50, 50])
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    red = read_rgb(tmp_path / "cmyk.jpg")[0, 0].astype(int)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    Image.new("CMYK", (4, 4), (255, 0, 255, 0)).save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "cmyk.tif")[0, 0], [0, 255, 0])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"])
def test_format_is_decided_by_content_not_extension(tmp_path, fmt) -> None:
    pixels = np.zeros((8, 10, 3), dtype=np.uint8)
    pixels[:, 5:] = (0, 0, 255)
    path = tmp_path / ("image.png" if fmt != "PNG" else "image.jpg")
    extra = (
        {"quality": 100, "subsampling": 0}
        if fmt == "JPEG"
        else {"lossless": True}
        if fmt == "WEBP"
        else {}
    )
    Image.fromarray(pixels).save(path, format=fmt, **extra)
    image = read_rgb(path).astype(int)
    assert image.shape == (8, 10, 3) and image.dtype == np.int64
    assert np.abs(image - pixels).max() < 8
    assert read_header(path).format == fmt


def test_broken_files_are_errors_naming_the_file(tmp_path) -> None:
    Image.fromarray(np.full((48, 64, 3), 90, dtype=np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "padded.jpg").write_bytes(data + b"\0" * 100)  # trailing bytes: still fine
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "ok.png")
    png = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    assert read_header(tmp_path / "padded.jpg").width == 64
    assert read_rgb(tmp_path / "padded.jpg").shape == (48, 64, 3)
    for name, words in [
        ("cut.jpg", "truncated"),
        ("cut.png", "cut.png"),
        ("empty.jpg", "empty (0 bytes)"),
        ("text.jpg", "cannot identify"),
    ]:
        for reader in (read_header, read_rgb):
            with pytest.raises(ImageReadError, match=name) as err:
                reader(tmp_path / name)
            assert words in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        read_header(tmp_path / "missing.jpg")
    results = read_headers([tmp_path / "ok.jpg", tmp_path / "cut.jpg", tmp_path / "missing.jpg"])
    assert results[0].width == 64
    assert isinstance(results[1], ImageReadError) and isinstance(results[2], FileNotFoundError)
