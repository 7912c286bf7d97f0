"""Inference speed of mnv3det's SSDLite vs torchvision's, same weights, measured in one run.

Builds torchvision's ``ssdlite320_mobilenet_v3_large`` (random weights and BatchNorm statistics,
or ``--weights`` = torchvision's published checkpoint), loads the same weights into
``mnv3det.ssdlite`` and times end-to-end ``model(images)`` in eval mode (normalise + resize,
backbone, heads, decoding, NMS, boxes mapped back to the input pixels) at each batch size. The
two models are timed alternately, repeat by repeat, so that load from other processes affects
both alike. Prints a markdown table of milliseconds per image: median and the spread
(interquartile range, min-max) over the repeats.

    python tools/benchmark_ssdlite.py                      # batch 1 and 8, 320x320 inputs
    python tools/benchmark_ssdlite.py --threads 1 --repeats 20 --image-size 480 640

With random weights nearly every class has 300 candidates above the 0.001 score threshold, the
worst case for post-processing; a trained checkpoint (``--weights``) has far fewer.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mnv3det.models.from_checkpoint import load_model
from mnv3det.testing import randomize_weights


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return q[0], q[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, nargs=2, default=[320, 320], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--weights", type=Path, default=None, help="torchvision SSDLite checkpoint")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    tv = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)  # reduced tail
    if args.weights is not None:
        from mnv3det.weights import read_state_dict

        tv.load_state_dict(read_state_dict(args.weights)[0])
    else:
        randomize_weights(tv)
    tv.eval()
    ours = load_model(tv.state_dict(), builder="ssdlite")  # reduced tail, 91 classes: inferred
    models = {"torchvision": tv, "mnv3det": ours}

    h, w = args.image_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch_sizes:
        images = [torch.rand(3, h, w, generator=gen) for _ in range(batch)]
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for _ in range(args.warmup):
                for model in models.values():
                    model(images)
            for _ in range(args.repeats):
                for name, model in models.items():
                    t0 = time.perf_counter()
                    model(images)
                    times[name].append((time.perf_counter() - t0) * 1000 / batch)
        for name, values in times.items():
            q1, q3 = _quartiles(values)
            rows.append((name, batch, statistics.median(values), q1, q3, min(values), max(values)))

    threads = torch.get_num_threads()
    weights = "torchvision checkpoint" if args.weights else "random weights (worst-case NMS load)"
    print(
        f"SSDLite320-MobileNetV3-Large, {h}x{w} inputs, {weights}; CPU: "
        f"{platform.processor() or platform.machine()}, {threads} torch threads, "
        f"torch {torch.__version__}; {args.repeats} repeats after {args.warmup} warm-up\n"
    )
    print("| model | batch | ms/image (median) | IQR | min-max |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, med, q1, q3, lo, hi in rows:
        print(f"| {name} | {batch} | {med:.1f} | {q1:.1f}-{q3:.1f} | {lo:.1f}-{hi:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
