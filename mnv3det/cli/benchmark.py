"""``mnv3det benchmark``: one speed table, ours next to torchvision's, on this machine (paper §7).

Times torchvision's SSDLite320-MobileNetV3-Large and LR-ASPP-MobileNetV3-Large next to ours with
the same weights, eager, fused (+ channels_last), ONNX fp32 and int8, at each batch size (see
:mod:`mnv3det.deploy.benchmark.zoo` for the configurations, :mod:`mnv3det.deploy.benchmark.runner`
for how they are timed). ``python tools/benchmark.py`` is the same command. Examples::

    mnv3det benchmark --models ssdlite --configs torchvision,eager --rounds 5    # same weights
    mnv3det benchmark --models lraspp --batch-sizes 1 --seg-size 1024x2048 --random-bn
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mnv3det.deploy.benchmark.report import markdown_table
from mnv3det.deploy.benchmark.runner import run_benchmark
from mnv3det.deploy.benchmark.timing import busy_warnings
from mnv3det.deploy.benchmark.zoo import CONFIGS, MODEL_NAMES, SCORE_REGIMES
from mnv3det.help_format import DefaultsHelpFormatter

__all__ = ["main"]


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HxW like 1024x2048, got {text!r}") from err
    return h, w


def main(argv: Sequence[str] | None = None) -> int:
    """``mnv3det benchmark``: print the markdown speed table."""
    parser = argparse.ArgumentParser(
        prog="mnv3det benchmark",
        description="One speed table on this machine: our SSDLite and LR-ASPP (eager, fused, "
        "channels_last, ONNX fp32, ONNX int8) next to torchvision's with the same weights.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--models", default="ssdlite,lraspp", help="ssdlite,lraspp")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=",".join(CONFIGS))
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per config")
    parser.add_argument("--seg-iters", type=int, default=None, help="iterations for LR-ASPP")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time the configurations in turn this many times and pool them (drift on a "
        "shared machine then hits every configuration alike)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seg-size", type=_size, default=(1024, 2048))
    parser.add_argument("--det-size", type=_size, default=(320, 320), help="input image size")
    parser.add_argument("--calib-images", type=int, default=20, help="int8 calibration images")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per config")
    parser.add_argument(
        "--passive",
        action="store_true",
        help="threads sleep instead of spinning while waiting (OMP_WAIT_POLICY=PASSIVE, ORT "
        "allow_spinning=0): on a shared machine other processes then cannot inflate the "
        "timings 10-40x through spin-waiting thread pools",
    )
    parser.add_argument(
        "--reuse-freed-memory",
        action="store_true",
        help="every row's process keeps freed memory for reuse instead of page-faulting large "
        "activations in again on each call (glibc; mnv3det.deploy.memory); a large effect on "
        "LR-ASPP at 1024x2048, for torchvision too",
    )
    parser.add_argument(
        "--ssdlite-weights",
        default=None,
        help="torchvision ssdlite320_mobilenet_v3_large checkpoint to time instead of random "
        "weights (a trained model: far fewer NMS candidates)",
    )
    parser.add_argument(
        "--lraspp-weights",
        default=None,
        help="torchvision lraspp_mobilenet_v3_large checkpoint instead of random weights",
    )
    parser.add_argument(
        "--random-bn",
        action="store_true",
        help="randomise the BatchNorm statistics of the random weights (activations of a "
        "realistic range instead of near zero)",
    )
    parser.add_argument(
        "--score-regimes",
        default="trained,heavy",
        help="SSDLite score distributions, each timed as its own rows: trained (about 1 %% of "
        "scores above 0.001), heavy (sharpened class logits: 90 classes x 300 NMS candidates), "
        "random (the weights as they are; random init: all scores equal); 'none' = no change",
    )
    parser.add_argument(
        "--no-load-check",
        action="store_true",
        help="skip measuring the machine's load (a calibration loop before and after)",
    )
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON")
    parser.add_argument("--workdir", default=None, help="keep weights and ONNX files here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    for name, values, allowed in (
        ("--models", models, ("ssdlite", "lraspp")),
        ("--configs", configs, CONFIGS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"{name}: unknown {bad or values}; choose from {', '.join(allowed)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    regimes: list[str | None] = [r for r in args.score_regimes.split(",") if r]
    if regimes == ["none"] or args.ssdlite_weights:
        regimes = [None]  # a checkpoint brings its own score distribution
    bad = [r for r in regimes if r is not None and r not in SCORE_REGIMES]
    if bad:
        parser.error(f"--score-regimes: unknown {bad}; choose from {', '.join(SCORE_REGIMES)}")
    load: dict | None = None if args.no_load_check else {}
    rows = run_benchmark(
        models,
        batches,
        configs,
        iters=args.iters,
        warmup=args.warmup,
        threads=args.threads,
        seg_size=args.seg_size,
        det_size=args.det_size,
        seg_iters=args.seg_iters,
        calib_images=args.calib_images,
        subprocesses=not args.in_process,
        passive=args.passive,
        workdir=args.workdir,
        log=lambda s: print(s, file=sys.stderr),
        rounds=args.rounds,
        weights={"ssdlite": args.ssdlite_weights, "lraspp": args.lraspp_weights},
        random_bn=args.random_bn,
        regimes=regimes,
        load=load,
        reuse_memory=args.reuse_freed_memory,
    )
    parities = {r["model"]: r["parity"] for r in rows if "parity" in r}
    notes = [
        f"{MODEL_NAMES[m]}: max |logits difference| ours vs torchvision (same weights) {v:.2e}."
        for m, v in parities.items()
    ]
    seen = set()
    for r in rows:
        if r.get("regime") and r["regime"] not in seen:
            seen.add(r["regime"])
            st = r["regime_stats"]
            notes.append(
                f"{r['regime']} scores: {st['candidates']} (anchor, class) scores above 0.001 "
                f"per image{'' if st['distinct'] else ' (with exactly equal scores)'}."
            )
    if args.reuse_freed_memory:
        notes.append(
            "--reuse-freed-memory: every row's process keeps freed memory for reuse "
            "(glibc M_MMAP_MAX=0, no trimming)."
        )
    if load is not None:
        warnings = busy_warnings(load.get("before"), load.get("after"))
        b, a = load.get("before"), load.get("after")
        notes.append(
            f"Machine load: calibration loop {b['calib_ms']:.1f} ms (spread {b['calib_spread']:.2f}) "
            f"before, {a['calib_ms']:.1f} ms (spread {a['calib_spread']:.2f}) after; other "
            f"processes {100 * b['busy']:.0f} % / {100 * a['busy']:.0f} % CPU, steal "
            f"{100 * b['steal']:.0f} % / {100 * a['steal']:.0f} %."
        )
        for w in warnings:
            print(f"mnv3det benchmark: WARNING: busy machine: {w}", file=sys.stderr)
        if warnings:
            notes.append(
                "**Busy machine**: " + "; ".join(warnings) + ". Absolute times are inflated; "
                "compare the ratios of interleaved rounds (--rounds) and the IQR."
            )
    table = markdown_table(rows, args.threads, notes)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
