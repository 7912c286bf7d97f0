"""Training step time of our tasks next to torchvision's models, same weights, same batch.

One training step = forward, loss, backward, optimiser step (SGD, momentum 0.9), as the recipes
run it:

* ``torchvision``: ``ssdlite320_mobilenet_v3_large`` / ``lraspp_mobilenet_v3_large`` (random
  weights, seeded), ``model(images, targets)`` / cross-entropy of ``model(x)["out"]``, plain
  ``torch.optim.SGD`` as torchvision's reference ``train.py`` builds it;
* ``ours ...``: :class:`~mnv3det.tasks.detection.DetectionTask` /
  :class:`~mnv3det.tasks.segmentation.SegmentationTask` loaded with *torchvision's* weights
  (``weights=`` its state_dict file), ``task.training_step`` (Lightning's ``self.log`` left
  out), then backward and the optimiser ``configure_optimizers`` builds
  (:func:`mnv3det.tasks.optim.sgd_with_schedule`). ``ours`` is the task's defaults
  (channels_last, bf16 autocast on a CPU with native bf16, fused SGD); ``ours fp32 NCHW``
  turns those off (``channels_last=False, train_autocast="off"``, SGD unfused), the tasks as
  they were before; ``ours fp32 CL`` keeps channels_last and fused SGD only.

The configurations run in interleaved rounds (one step of each per round, the order rotated
every round) so that a machine shared with other work slows them alike; the table gives the
median and interquartile range over the rounds of the wall-clock time and of this process's
CPU time (``time.process_time``: on an oversubscribed machine the wall clock also counts time
the process waited for a core; the CPU time does not, but includes OpenMP spin-waiting when
more than one thread runs), and both ratios to torchvision. Machine load is measured before and
after (:func:`mnv3det.deploy.benchmark.timing.machine_load`) and a busy machine is reported.

Usage::

    python tools/train_step_benchmark.py                       # both models, defaults below
    python tools/train_step_benchmark.py --models ssdlite --rounds 20 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnv3det.deploy.benchmark.timing import load_report, machine_load
from mnv3det.help_format import DefaultsHelpFormatter
from mnv3det.models.normalize import IMAGENET_MEAN, IMAGENET_STD
from mnv3det.tasks.optim import sgd_with_schedule
from mnv3det.tasks.speed import cpu_has_native_bf16

Step = Callable[[], None]

#: Our configurations: label -> task arguments.
OUR_CONFIGS: dict[str, dict[str, Any]] = {
    "ours fp32 NCHW": {"channels_last": False, "train_autocast": "off", "fused": False},
    "ours fp32 CL": {"channels_last": True, "train_autocast": "off", "fused": None},
    "ours": {},
}
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 4e-5


def _pair(text: str) -> tuple[int, int]:
    """``"512x1024"`` or ``"320"`` -> ``(H, W)``."""
    parts = [int(v) for v in text.lower().split("x")]
    return (parts[0], parts[-1])


# ----------------------------------------------------------------------------- batches
def detection_batch(batch: int, size: int, seed: int = 0) -> tuple[list[Tensor], list[dict]]:
    """``batch`` images ``(3, size, size)`` in [0, 1] and 1-6 random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 7, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = (torch.rand(n, 2, generator=g) * 0.35 + 0.05) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 91, (n,), generator=g)})
    return images, targets


def segmentation_batch(
    batch: int, hw: tuple[int, int], classes: int = 21, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(batch, 3, H, W)`` images in [0, 1] and masks of ``classes`` labels with 5 % ignored."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *hw, generator=g)
    coarse = torch.randint(0, classes, (batch, 1, hw[0] // 32, hw[1] // 32), generator=g)
    masks = F.interpolate(coarse.float(), size=hw, mode="nearest")[:, 0].long()
    masks[torch.rand(batch, *hw, generator=g) < 0.05] = 255
    return images, masks


# ------------------------------------------------------------------------------- steps
def _sgd_step(loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def torchvision_step(kind: str, model: nn.Module, batch: tuple) -> Step:
    """torchvision's training step (its reference script's SGD, unfused)."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    model.train()
    if kind == "ssdlite":
        images, targets = batch

        def step() -> None:
            losses = model(images, targets)
            _sgd_step(sum(losses.values()), optimizer)

        return step
    images, masks = batch
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def seg_step() -> None:
        logits = model((images - mean) / std)["out"]
        _sgd_step(F.cross_entropy(logits, masks, ignore_index=255), optimizer)

    return seg_step


def our_step(kind: str, weights: Path, batch: tuple, options: dict[str, Any]) -> Step:
    """Our task's training step with torchvision's weights and ``options``."""
    options = dict(options)
    fused = options.pop("fused", None)
    torch.manual_seed(0)
    if kind == "ssdlite":
        from mnv3det.tasks.detection import DetectionTask

        task = DetectionTask(
            "large", num_classes=91, reduced_tail=True, weights=str(weights), **options
        )
        schedule = "cosine"
    else:
        from mnv3det.tasks.segmentation import SegmentationTask

        task = SegmentationTask(
            "large", num_classes=21, reduced_tail=False, weights=str(weights), **options
        )
        schedule = "poly"
    task.log = lambda *args, **kwargs: None  # Lightning's logging needs a Trainer
    task.on_fit_start()  # what fit does first (channels_last)
    task.train()
    optimizer = sgd_with_schedule(
        task.model, LR, MOMENTUM, WEIGHT_DECAY, 1000, 0, schedule, fused=fused
    )["optimizer"]
    counter = iter(range(10**9))

    def step() -> None:
        _sgd_step(task.training_step(batch, next(counter)), optimizer)

    return step


def build(kind: str, args: argparse.Namespace, folder: Path) -> dict[str, Step]:
    """Every configuration's step for ``kind``, sharing torchvision's random weights."""
    import torchvision

    torch.manual_seed(0)
    if kind == "ssdlite":
        tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None
        )
        batch = detection_batch(args.det_batch, args.det_size)
    else:
        tv = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=21
        )
        batch = segmentation_batch(args.seg_batch, _pair(args.seg_size))
    weights = folder / f"{kind}_torchvision.pth"
    torch.save(tv.state_dict(), weights)
    steps = {"torchvision": torchvision_step(kind, tv, batch)}
    for label in args.configs:
        steps[label] = our_step(kind, weights, batch, OUR_CONFIGS[label])
    return steps


# ------------------------------------------------------------------------------ timing
def interleaved(steps: dict[str, Step], rounds: int, warmup: int) -> dict[str, dict]:
    """Wall and CPU milliseconds of each step over ``rounds`` interleaved rounds."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append((time.perf_counter() - t0) * 1000)
            cpu[name].append((time.process_time() - c0) * 1000)
    return {n: {"wall": wall[n], "cpu": cpu[n]} for n in names}


def _stats(values: list[float]) -> tuple[float, float]:
    """Median and interquartile range."""
    q25, q75 = np.percentile(values, [25, 75])
    return statistics.median(values), float(q75 - q25)


def table(results: dict[str, dict[str, dict]], setting: dict[str, str]) -> str:
    """The Markdown table of every model's configurations."""
    lines = [
        "| model | setting | config | wall ms/step (median) | IQR | CPU ms/step (median) | "
        "IQR | vs torchvision (wall) | vs torchvision (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"ssdlite": "SSDLite320-MNV3-Large", "lraspp": "LR-ASPP-MNV3-Large"}
    for kind, rows in results.items():
        base_wall = _stats(rows["torchvision"]["wall"])[0]
        base_cpu = _stats(rows["torchvision"]["cpu"])[0]
        for label, row in rows.items():
            wall, wall_iqr = _stats(row["wall"])
            cpu, cpu_iqr = _stats(row["cpu"])
            lines.append(
                f"| {names[kind]} | {setting[kind]} | {label} | {wall:.0f} | {wall_iqr:.0f} | "
                f"{cpu:.0f} | {cpu_iqr:.0f} | {wall / base_wall:.2f}x | {cpu / base_cpu:.2f}x |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["ssdlite", "lraspp"],
                        choices=["ssdlite", "lraspp"], help="models to time")  # fmt: skip
    parser.add_argument("--configs", nargs="+", default=list(OUR_CONFIGS),
                        choices=list(OUR_CONFIGS), help="our configurations")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core)")  # fmt: skip
    parser.add_argument("--det-batch", type=int, default=8, help="SSDLite images per step")
    parser.add_argument("--det-size", type=int, default=320, help="SSDLite image side")
    parser.add_argument("--seg-batch", type=int, default=2, help="LR-ASPP images per step")
    parser.add_argument("--seg-size", default="512x1024",
                        help="LR-ASPP crop HxW (the Cityscapes recipe's)")  # fmt: skip
    parser.add_argument("--no-load-check", action="store_true",
                        help="skip the machine-load measurement before and after")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, native bf16: "
        f"{cpu_has_native_bf16()}; {args.rounds} interleaved rounds after {args.warmup} warm-up"
    )
    before = None if args.no_load_check else machine_load(threads)
    setting = {
        "ssdlite": f"batch {args.det_batch}, {args.det_size}x{args.det_size}",
        "lraspp": f"batch {args.seg_batch}, {args.seg_size}, 21 classes",
    }
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            steps = build(kind, args, Path(tmp))
            results[kind] = interleaved(steps, args.rounds, args.warmup)
    after = None if args.no_load_check else machine_load(threads)
    print(table(results, setting))
    for line in load_report(before, after):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
