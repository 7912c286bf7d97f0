"""tools/input_pipeline_benchmark.py: its COCO-like data is valid COCO, and a tiny run prints
the table with every pipeline, positive throughputs, and the same images through each (no
timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

TOOL = Path(__file__).resolve().parents[1] / "tools" / "input_pipeline_benchmark.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("input_pipeline_benchmark", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_generated_data_is_coco_like(tool, tmp_path) -> None:
    root = tool.write_synthetic_coco(tmp_path, num_images=6, seed=1)
    doc = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert len(doc["categories"]) == 80
    category_ids = {c["id"] for c in doc["categories"]}
    assert len(doc["images"]) == 6
    per_image = {im["id"]: 0 for im in doc["images"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    for im in doc["images"]:
        with Image.open(root / "train2017" / im["file_name"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == sizes[im["id"]] and image.size in tool.COCO_SIZES
    for ann in doc["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert w > 1 and h > 1 and x >= 0 and y >= 0
        assert x + w <= width + 0.01 and y + h <= height + 0.01
        assert ann["category_id"] in category_ids and ann["iscrowd"] == 0 and ann["area"] > 0
        per_image[ann["image_id"]] += 1
    assert all(1 <= n <= 8 for n in per_image.values())
    # deterministic in the seed
    again = tool.write_synthetic_coco(tmp_path / "again", num_images=6, seed=1)
    assert (again / "annotations" / "instances_train2017.json").read_text() == json.dumps(doc)


@pytest.mark.slow
def test_tiny_run_prints_every_pipeline(tool, capsys) -> None:
    argv = ["--images", "8", "--batch-size", "4", "--workers", "0", "--rounds", "1"]
    assert tool.main([*argv, "--no-load-check"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = rows[0], rows[1:]
    assert header.split("|")[1:-1] == [
        " pipeline ", " augmentation ", " workers ", " batch ", " images/s (median) ", " IQR ",
        " vs torchvision reference (same preset) ",
    ]  # fmt: skip
    names = [row.split("|")[1].strip() for row in rows]
    assert names == [
        "ours (ssdlite)",
        "torchvision reference (ssdlite)",
        "torchvision reference (ssdlite) + resize 320 in loader",
        "torchvision reference (ssdlite, v1 default)",
        "ours (ssd)",
        "torchvision reference (ssd)",
        "torchvision reference (ssd) + resize 320 in loader",
    ]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2:4] == ["0", "4"]
        assert float(cells[4]) > 0 and float(cells[5]) >= 0
        assert float(cells[6].rstrip("x")) > 0
    assert rows[1].split("|")[7].strip() == rows[5].split("|")[7].strip() == "1.00x"
    # both pipelines load the same images: all 8 in the pass
    assert "every pipeline loaded all 8 images in every pass" in out
    assert "workers 0, ours (ssdlite) / torchvision reference (ssdlite): " in out
    assert "workers 0, ours (ssd) / torchvision reference (ssd): " in out
