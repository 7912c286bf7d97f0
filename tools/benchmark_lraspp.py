"""CPU latency of LR-ASPP-MobileNetV3 at Cityscapes resolution: ours vs torchvision, same weights.

The MobileNetV3 paper (§6.4, Table 7) reports LR-ASPP cost at 1024x2048 (9.74B MAdds for Large
RF2). This script times one 1024x2048 image through

* torchvision's ``lraspp_mobilenet_v3_large`` (random weights, randomised BatchNorm statistics),
* ``mnv3det.lraspp`` loaded from the *same* checkpoint file (must give the same logits: the
  max abs difference is printed),
* optionally the paper's variants (``--variants``: Large RF2 / Small RF2, 19 classes, global and
  paper pooling) for reference,

in one run, interleaving the models round by round so that machine load affects all equally,
and prints a markdown table with the median and the spread (min-max and interquartile range).

    python tools/benchmark_lraspp.py --threads 1 --repeats 7 --variants
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mnv3det.testing import randomize_bn_stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", action="store_true", help="also time the paper's RF2 models")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)

    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    import mnv3det
    from mnv3det.models.from_checkpoint import load_model

    torch.manual_seed(0)
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    randomize_bn_stats(tv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lraspp_mobilenet_v3_large.pth"
        torch.save(tv.state_dict(), path)
        ours = load_model(path, builder="lraspp")  # full tail, 21 classes: from the tensors

    def tv_forward(x: torch.Tensor) -> torch.Tensor:
        return tv(x)["out"]

    models: list[tuple[str, object]] = [
        ("torchvision lraspp_mobilenet_v3_large", tv_forward),
        ("mnv3det.lraspp, torchvision's weights", ours),
    ]
    if args.variants:
        for arch in ("large", "small"):
            for pooling in ("global", "paper"):
                models.append(
                    (
                        f"mnv3det.lraspp {arch} RF2, 19 cls, {pooling} gate",
                        mnv3det.lraspp(arch, pooling=pooling),
                    )
                )
    for _, model in models:
        if isinstance(model, torch.nn.Module):
            model.eval()
    tv.eval()

    x = torch.randn(1, 3, args.height, args.width)
    with torch.inference_mode():
        diff = (tv_forward(x) - ours(x)).abs().max().item()
        for _ in range(args.warmup):
            for _, model in models:
                model(x)
        times: dict[str, list[float]] = {name: [] for name, _ in models}
        for _ in range(args.repeats):  # interleaved: load changes hit every model alike
            for name, model in models:
                start = time.perf_counter()
                model(x)
                times[name].append(1000 * (time.perf_counter() - start))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"LR-ASPP CPU latency, 1 image {args.height}x{args.width}, fp32 eager, "
        f"{args.threads} thread(s), {args.repeats} runs each (after {args.warmup} warm-up), "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average at end {load:.1f}\n"
    )
    print("| model | median ms | min-max ms | IQR ms |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        values = sorted(values)
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        print(
            f"| {name} | {statistics.median(values):.0f} | {values[0]:.0f}-{values[-1]:.0f} "
            f"| {q[0]:.0f}-{q[2]:.0f} |"
        )
    print(f"\nmax |logits difference| ours vs torchvision (same weights): {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
