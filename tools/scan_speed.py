"""Time the data-set check of mnv3det against full decoding, per 1,000 COCO-size JPEGs.

Writes ``--images`` JPEGs of 640x480 (quality 90, random-texture content so they are COCO-sized,
~100-200 kB) with a COCO annotation file to a temporary folder, then times:

* ``read_headers`` with 1 thread and with the default thread pool (what the check runs);
* the whole ``CocoDetection(...)`` construction (annotation file, index, header scan);
* decoding every image with ``read_rgb`` (what a check that reads pixels would cost).

The files are in the page cache (just written), so this is the cost of the scan itself; on a
cold network disk the thread pool hides part of the latency. Usage::

    python tools/scan_speed.py --images 2000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mnv3det.data.coco import CocoDetection
from mnv3det.data.image_io import read_headers, read_rgb


def make_images(root: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` 640x480 JPEGs (quality 90) and ``annotations/instances_train2017.json``."""
    rng = np.random.default_rng(seed)
    folder = root / "train2017"
    folder.mkdir(parents=True)
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(base).resize((160, 120)).resize((640, 480)))
    paths, images, anns = [], [], []
    for i in range(count):
        shifted = np.roll(base, shift=(i * 7) % 480, axis=0)
        path = folder / f"{i:012d}.jpg"
        Image.fromarray(shifted).save(path, quality=90)
        paths.append(path)
        images.append({"id": i + 1, "file_name": path.name, "width": 640, "height": 480})
        anns.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 100, 80],
             "area": 8000.0, "iscrowd": 0}
        )  # fmt: skip
    (root / "annotations").mkdir()
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    return paths


def timed(function, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times, seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to write and scan")
    parser.add_argument("--decode", type=int, default=300, help="images to decode for comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_images(root, args.images)
        size_kb = np.mean([p.stat().st_size for p in paths]) / 1024
        threads = min(32, 4 * (os.cpu_count() or 1))
        rows = [
            ("read_headers, 1 thread", timed(lambda: read_headers(paths, threads=1)), len(paths)),
            (
                f"read_headers, {threads} threads (default)",
                timed(lambda: read_headers(paths)),
                len(paths),
            ),
            (
                "CocoDetection(...) construction (default)",
                timed(lambda: CocoDetection(root, "train2017")),
                len(paths),
            ),
            (
                "read_rgb (full decode), 1 thread",
                timed(lambda: [read_rgb(p) for p in paths[: args.decode]], repeats=1),
                min(args.decode, len(paths)),
            ),
        ]
    print(f"{args.images} JPEGs 640x480 q90 ({size_kb:.0f} kB each), {os.cpu_count()} CPUs")
    print("| what | s per 1,000 images | COCO train2017 (118,287) |")
    print("|---|---|---|")
    for name, seconds, n in rows:
        per_1000 = seconds / n * 1000
        print(f"| {name} | {per_1000:.2f} | {per_1000 * 118.287:.0f} s |")


if __name__ == "__main__":
    main()
