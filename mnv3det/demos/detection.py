"""``mnv3det demo detection``: SSDLite-MobileNetV3 learns generated COCO-format shapes on the CPU.

No COCO needed: :func:`mnv3det.data.synthetic_coco.generate_shapes_coco` writes a small data set
in the official COCO layout (``train2017/``, ``val2017/``, ``annotations/instances_*.json``;
circles, squares, triangles and crosses with non-contiguous category ids, varied sizes, colours
and backgrounds, overlaps, empty images and crowd regions) and the real pipeline trains on it:
:class:`~mnv3det.tasks.detection_data.CocoDataModule` (SSD augmentation with albumentations),
:class:`~mnv3det.tasks.detection.DetectionTask` (SSDLite of paper §6.3 on MobileNetV3, multibox
loss, warm-up + cosine SGD) and pycocotools' COCOeval on the validation split. It prints the
COCO table and the AP of each class, and writes under ``--output-dir`` (through
:class:`mnv3det.tasks.plots.PlotWriter`, as ``mnv3det validate`` does in a run folder):
``predictions.png`` (validation images, ground truth beside the detections, with a class legend),
``PR_curve.png`` (COCOeval's precision-recall curve per class), ``per_class_AP.png`` / ``.csv``
and ``results.png`` (the training curves); plus the metrics and ``last.ckpt``.

The defaults are tuned for a 2-core CPU (target: AP50 >= 0.5 in under 10 minutes): 480 training
images of 160x160 at a 160x160 network input, MobileNetV3-Small with the reduced tail (the last
stage halved: fewer MAdds for the same accuracy on this easy data), batch 16, 20 epochs (600
steps), lr 0.08 with 2 warm-up epochs then cosine, BatchNorm momentum 0.1 (SSDLite's 0.03 is
made for 100k-step runs: after a few hundred steps its running statistics would lag the
weights). The SSD augmentation is **off** by default: it is made for hundreds of epochs, and in a
run this short it costs more than it gives (measured at 16 epochs: AP50 0.80 without it, 0.14
with torchvision's "ssdlite" preset of min-IoU crop + flip); ``--augment`` turns it on. One
compute thread plus one data-loading process keeps both cores busy without oversubscription,
which on a shared machine is several times faster than two compute threads.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from mnv3det.help_format import DefaultsHelpFormatter

TARGET_AP50 = 0.5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnv3det demo detection",
        formatter_class=DefaultsHelpFormatter,
        description="Train SSDLite-MobileNetV3 on generated COCO-format shapes (CPU) and evaluate "
        "it with pycocotools.",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output/detection"))
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--num-train", type=int, default=480, help="generated training images")
    parser.add_argument("--num-val", type=int, default=120, help="generated validation images")
    parser.add_argument("--image-size", type=int, default=160, help="generated image side")
    parser.add_argument("--size", type=int, default=160, help="network input side")
    parser.add_argument("--arch", choices=("small", "large"), default="small")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier")
    parser.add_argument(
        "--full-tail", action="store_true", help="do not halve the last stage (reduced_tail off)"
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SSD augmentation (photometric, zoom-out, min-IoU crop, flip) for training; off by "
        "default: it slows convergence in a few-hundred-step run (see the module docstring)",
    )
    parser.add_argument("--zoom-out", type=float, default=2.0, help="largest zoom-out ratio")
    parser.add_argument("--photometric", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.08)
    parser.add_argument("--warmup-epochs", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-pictures", type=int, default=8, help="validation images to draw")
    return parser


def main(argv: list[str]) -> int:
    """Run the demo; returns 0 when AP50 reaches the target, 1 otherwise."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from mnv3det.data.synthetic_coco import generate_shapes_coco
    from mnv3det.metrics.coco import format_ap_table, per_class_ap
    from mnv3det.tasks.checkpoint_io import AtomicCheckpointIO
    from mnv3det.tasks.detection import DetectionTask
    from mnv3det.tasks.detection_data import CocoDataModule
    from mnv3det.tasks.plots import PlotWriter

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    torch.set_num_threads(args.threads)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    root = generate_shapes_coco(
        out / "data",
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        seed=args.seed,
    )
    t_data = time.perf_counter() - start
    print(
        f"[demo] data: {args.num_train} train / {args.num_val} val images at {root} ({t_data:.0f} s)"
    )

    L.seed_everything(args.seed, verbose=False)
    data = CocoDataModule(
        root,
        size=args.size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        label_map="contiguous",
        augment=args.augment,
        zoom_out_max_scale=args.zoom_out,
        photometric=args.photometric,
        pin_memory=False,
    )
    data.setup("fit")
    task = DetectionTask(
        args.arch,
        num_classes=data.num_classes,
        size=args.size,
        width_mult=args.width,
        reduced_tail=not args.full_tail,
        lr=args.lr,
        weight_decay=4e-5,
        warmup_epochs=args.warmup_epochs,
        bn_momentum=0.1,
        detections_per_img=100,
        print_table=False,
    )
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", monitor="val/map", mode="max", save_last=True
    )
    plots = PlotWriter(
        dirpath=out, num_images=args.num_pictures, score_thresh=0.4, sheet_name="predictions.png"
    )
    trainer = L.Trainer(
        plugins=[AtomicCheckpointIO()],  # the CLI's checkpoint writer
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        check_val_every_n_epoch=args.epochs,  # evaluate once, at the end
        num_sanity_val_steps=0,
        logger=CSVLogger(out, name="logs"),
        callbacks=[checkpoint, plots],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    n_params = sum(p.numel() for p in task.model.parameters())
    print(
        f"[demo] training SSDLite-MobileNetV3-{args.arch.capitalize()} ({n_params / 1e6:.2f}M "
        f"params, {args.size}x{args.size} input, {data.num_classes - 1} classes) for "
        f"{args.epochs} epochs on the CPU ..."
    )
    t0 = time.perf_counter()
    trainer.fit(task, data)
    t_train = time.perf_counter() - t0
    stats = task.last_results["val"]
    print(
        f"[demo] trained in {t_train:.0f} s; COCO evaluation on {args.num_val} validation images:"
    )
    print(task.last_summary)
    curves = task.last_curves.get("val")
    if curves is not None:
        print(f"[demo] AP per class (%):\n{format_ap_table(per_class_ap(curves))}")
    (out / "metrics.json").write_text(json.dumps(stats, indent=2))
    total = time.perf_counter() - start
    ok = stats["map_50"] >= TARGET_AP50
    print(
        f"[demo] AP@[.5:.95] = {stats['map']:.3f}, AP50 = {stats['map_50']:.3f} "
        f"(target AP50 >= {TARGET_AP50}: {'reached' if ok else 'NOT reached'}); "
        f"total time {total:.0f} s"
    )
    print(f"[demo] wrote {out / 'metrics.json'}, {Path(checkpoint.dirpath) / 'last.ckpt'}")
    plots.print_written(
        {
            "predictions.png": "validation images: ground truth | prediction",
            "PR_curve.png": "precision-recall curve per class (IoU 0.5)",
            "per_class_AP.png": "AP per class",
            "results.png": "training curves",
        }
    )
    return 0 if ok else 1
