"""int8 calibration on real folders: mixed sizes and orientations, grayscale, untrained weights,
streamed statistics in bounded memory (:mod:`mnv3det.deploy.int8`)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import mnv3det
from mnv3det.cli.export import main as export_main
from mnv3det.cli.int8_accuracy import parse_recipe
from mnv3det.deploy.int8 import (
    ActivationStats,
    calibration_files,
    calibration_images,
    measure_quantization,
    quantize_onnx,
)
from mnv3det.deploy.onnx import export_lraspp, export_ssdlite

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def make_folder(folder, count: int = 8, scale: int = 1, seed: int = 0):
    """JPEGs as a COCO folder holds them: 640x480, 480x640, grayscale, EXIF-rotated (sideways).

    ``scale`` divides the sizes (small images for the memory test). Returns the upright
    ``(H, W)`` of each file, in name order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        h, w = ((480, 640), (640, 480), (427, 640), (500, 375))[i % 4]
        h, w = h // scale, w // scale
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * (1 + i % 3) % 256, yy * 2 % 256, (xx + yy) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        if i % 4 == 2:  # grayscale JPEG
            Image.fromarray(pixels[..., 1]).save(path, quality=85)
            sizes.append((h, w))
        elif i % 4 == 3:  # stored landscape, EXIF orientation 6: upright it is portrait
            image = Image.fromarray(pixels)
            exif = image.getexif()
            exif[0x0112] = 6
            image.save(path, quality=85, exif=exif)
            sizes.append((w, h))
        else:
            Image.fromarray(pixels).save(path, quality=85)
            sizes.append((h, w))
    return sizes


def run(path, image: np.ndarray):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": np.ascontiguousarray(image[None], dtype=np.float32)})


def test_calibration_images_reads_any_folder(tmp_path):
    sizes = make_folder(tmp_path / "photos", count=8, scale=4)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.jpg"):
        images = list(calibration_images("ssdlite", tmp_path / "photos", count=20))
    assert [i.shape for i in images] == [(3, h, w) for h, w in sizes]  # upright, RGB
    assert all(i.dtype == np.float32 and i.min() >= 0 and i.max() <= 1 for i in images)
    gray = images[2]
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    fixed = list(calibration_images("ssdlite", tmp_path / "photos", count=3, size=(64, 96)))
    assert [i.shape for i in fixed] == [(3, 64, 96)] * 3
    # a seeded subset, the same for every call; COCO layout: the train2017 folder
    assert calibration_files("ssdlite", tmp_path / "photos", 3) == calibration_files(
        "ssdlite", tmp_path / "photos", 3
    )
    make_folder(tmp_path / "coco" / "train2017", count=2, scale=8)
    make_folder(tmp_path / "coco" / "val2017", count=3, scale=8)
    assert {p.parent.name for p in calibration_files("ssdlite", tmp_path / "coco")} == {"train2017"}
    with pytest.raises(FileNotFoundError, match="split folder"):
        calibration_files("ssdlite", tmp_path / "coco", split="train2014")


def test_activation_stats_merge_any_shapes_and_constants():
    rng = np.random.default_rng(0)
    shapes = ((0.5, (3, 700)), (4.0, (500,)), (2.0, (2, 3, 1100)))
    parts = [rng.normal(0, s, shape).astype(np.float32) for s, shape in shapes]
    stats = ActivationStats(bins=1024)
    for part in parts:
        stats.update("x", part)
    stats.update("const", np.full((4, 4), 0.25, np.float32))
    stats.update("const", np.full((9,), 0.25, np.float32))
    stats.update("near", np.float32(1.0) + np.float32(1e-7) * np.arange(5, dtype=np.float32))
    stats.update("zero", np.zeros(6, np.float32))
    stats.update("nan", np.array([np.nan, 1.0, -2.0], np.float32))
    merged = np.concatenate([p.ravel() for p in parts])
    limit = stats.limit["x"]
    expected, _ = np.histogram(merged, bins=1024, range=(-limit, limit))
    assert np.array_equal(stats.hist["x"], expected)  # merging is exact
    for method in ("minmax", "percentile", "entropy"):
        ranges = stats.ranges(method, percentile=99.0)
        low, high = ranges["x"]
        assert merged.min() <= low < 0 < high <= merged.max()
        assert ranges["const"] == pytest.approx((0.25, 0.25))
        assert ranges["zero"] == (0.0, 0.0)
        assert ranges["near"][0] == pytest.approx(1.0) and ranges["nan"] == (-2.0, 1.0)
    assert stats.ranges("minmax")["x"] == (merged.min(), merged.max())
    high99 = stats.ranges("percentile", percentile=99.0)["x"][1]
    assert high99 == pytest.approx(np.percentile(np.abs(merged), 99.0), rel=0.05)
    with pytest.raises(ValueError, match="calibration must be"):
        stats.ranges("kl")
    with pytest.raises(ValueError, match="histogram=True"):
        ActivationStats(histogram=False).ranges("entropy")


@pytest.mark.slow
def test_int8_export_of_untrained_ssdlite_on_a_mixed_folder(tmp_path):
    """The reported failures: a folder of 640x480 and 480x640 (grayscale, EXIF-rotated) JPEGs
    and untrained weights, through ``mnv3det export --int8 --calib-root FOLDER``."""
    make_folder(tmp_path / "photos", count=8)
    out = tmp_path / "det.onnx"
    args = ["--model", "ssdlite", "--arch", "small", "--num-classes", "5", "--size", "128"]
    args += ["--width-mult", "0.5", "--output", str(out), "--int8"]
    for calibration in ("percentile", "entropy", "minmax"):
        int8 = tmp_path / f"det.{calibration}.int8.onnx"
        more = ["--calib-root", str(tmp_path / "photos"), "--calibration", calibration]
        assert export_main([*args, *more, "--int8-output", str(int8)]) == 0, calibration
        assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node) > 20
    for image in calibration_images("ssdlite", tmp_path / "photos", 4):
        h, w = image.shape[1:]
        boxes32, scores32, _, _ = run(out, image)
        boxes8, scores8, _, num8 = run(tmp_path / "det.percentile.int8.onnx", image)
        assert boxes8.shape == boxes32.shape and int(num8[0]) > 0
        assert boxes8[0, : int(num8[0])].max() <= max(h, w) + 1
        assert abs(float(scores8[0, 0]) - float(scores32[0, 0])) < 0.05


def test_int8_lraspp_untrained_close_to_fp32_on_mixed_sizes(tmp_path):
    make_folder(tmp_path / "photos", count=6, scale=4)
    torch.manual_seed(0)
    model = mnv3det.lraspp("small", num_classes=5, width_mult=0.5).eval()  # untrained
    fp32 = export_lraspp(model, tmp_path / "seg.onnx", example_size=(96, 128))
    images = calibration_images("lraspp", tmp_path / "photos", 6)  # a generator, read once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        int8 = quantize_onnx(fp32, tmp_path / "seg.int8.onnx", images)
    for image in calibration_images("lraspp", tmp_path / "photos", 3):
        (ref,) = run(fp32, image)
        (out,) = run(int8, image)
        assert out.shape == ref.shape == (1, 5, *image.shape[1:])
        assert np.abs(out - ref).mean() < 0.1 * np.abs(ref - ref.mean()).mean() + 1e-3


@pytest.mark.slow
def test_calibration_memory_does_not_grow_with_the_images(tmp_path):
    """Peak memory of a quantising subprocess: 40 images cost what 10 cost (onnxruntime's
    calibrators kept every activation of every image: 4x the growth)."""
    make_folder(tmp_path / "photos", count=40, scale=2)
    torch.manual_seed(0)
    model = mnv3det.ssdlite("large", num_classes=5, size=160, width_mult=0.5).eval()
    fp32 = export_ssdlite(model, tmp_path / "det.onnx")
    growth = {}
    for count in (10, 40):
        cost = measure_quantization(
            fp32, tmp_path / f"det{count}.int8.onnx", "ssdlite", tmp_path / "photos", count
        )
        growth[count] = cost["peak_rss_mb"] - cost["baseline_rss_mb"]
    # 10 images of 320x240 at 160 px hold ~60 MB of activations in onnxruntime's calibrator
    assert growth[40] < 1.3 * growth[10] + 25, growth


def test_parse_recipe():
    assert parse_recipe("minmax") == {"calibration": "minmax"}
    assert parse_recipe("percentile:99.9/per-tensor/float-pred") == {
        "calibration": "percentile",
        "percentile": 99.9,
        "per_channel": False,
        "float_prediction_layers": True,
    }
    for bad in ("kl", "entropy:99", "minmax/int4"):
        with pytest.raises(ValueError, match="recipe"):
            parse_recipe(bad)
