"""``mnv3det demo segmentation``: LR-ASPP-MobileNetV3 learns generated street scenes on the CPU.

No Cityscapes needed: :func:`mnv3det.data.synthetic_cityscapes.generate_street_scenes` writes a
small Cityscapes-format data set (official folder layout, ``*_gtFine_labelIds.png`` label ids;
road, sidewalk, building, vegetation, sky, person, car and void regions) and the real pipeline
trains on it: :class:`~mnv3det.tasks.segmentation_data.CityscapesDataModule` (random scale, crop
padded with 255, flip, jitter), :class:`~mnv3det.tasks.segmentation.SegmentationTask` (LR-ASPP
head of paper §6.4 on MobileNetV3-Small, poly SGD, cross-entropy ignoring 255) and the
confusion-matrix mIoU. It prints the per-class IoU table and writes under ``--output-dir``
overlays and label-id PNGs (``predictions/``) and, through :class:`mnv3det.tasks.plots.PlotWriter`
(as ``mnv3det validate`` does in a run folder), ``demo_segmentation.png`` (image | ground truth |
prediction | overlay, with column titles and a colour legend), ``IoU_per_class.png``,
``confusion_matrix_normalized.png`` and ``results.png`` (the training curves).

The defaults are tuned for a 2-core CPU: 128x256 images, 96x192 training crops, batch 8, 40
epochs over 60 images (~300 steps) with lr 0.05 and BatchNorm momentum 0.1 (torchvision's 0.01
is made for 100k-step runs: after a few hundred steps its running statistics would still be
near their initial values). One compute thread plus one data-loading process keeps both cores
busy without oversubscription, which on a shared machine is several times faster than two
compute threads.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from mnv3det.help_format import DefaultsHelpFormatter

TARGET_MIOU = 0.6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnv3det demo segmentation",
        formatter_class=DefaultsHelpFormatter,
        description="Train LR-ASPP-MobileNetV3 on generated Cityscapes-format street scenes (CPU).",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output/segmentation"))
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    parser.add_argument("--arch", choices=("small", "large"), default="small")
    parser.add_argument("--width", type=float, default=1.0, help="backbone width multiplier")
    parser.add_argument(
        "--pooling", choices=("global", "paper"), default="global", help="LR-ASPP gate pooling"
    )
    parser.add_argument(
        "--image-height", type=int, default=128, help="generated image height (width = 2x)"
    )
    parser.add_argument(
        "--crop-height", type=int, default=96, help="training crop height (width = 2x)"
    )
    parser.add_argument("--per-city", type=int, default=20, help="images per city and split")
    parser.add_argument("--cities", nargs="+", default=["aachen", "bremen", "zurich"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-pictures", type=int, default=6, help="validation images to draw")
    return parser


def main(argv: list[str]) -> int:
    """Run the demo; returns 0 (the mIoU and whether it reached the target are printed)."""
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.per_city < 1 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("--epochs, --per-city, --batch-size and --threads must be >= 1")
    if args.crop_height > args.image_height:
        raise SystemExit("--crop-height must not exceed --image-height")
    start = time.perf_counter()

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from mnv3det.data.synthetic_cityscapes import generate_street_scenes
    from mnv3det.tasks.checkpoint_io import AtomicCheckpointIO
    from mnv3det.tasks.plots import PlotWriter
    from mnv3det.tasks.segmentation import SegmentationTask
    from mnv3det.tasks.segmentation_data import CityscapesDataModule
    from mnv3det.tasks.segmentation_writer import SegmentationPredictionWriter

    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    size = (args.image_height, 2 * args.image_height)
    root = out / "data"
    print(
        f"[demo] generating {len(args.cities)} cities x {args.per_city} street scenes per split "
        f"({size[0]}x{size[1]}, Cityscapes layout) in {root}"
    )
    generate_street_scenes(root, args.cities, args.per_city, size, seed=args.seed)
    t_data = time.perf_counter() - start

    L.seed_everything(args.seed, verbose=False)
    data = CityscapesDataModule(
        root,
        crop_size=(args.crop_height, 2 * args.crop_height),
        scale_range=(0.75, 1.5),
        batch_size=args.batch_size,
        val_batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=False,
    )
    task = SegmentationTask(
        arch=args.arch,
        width_mult=args.width,
        pooling=args.pooling,
        lr=args.lr,
        weight_decay=4e-5,
        warmup_steps=20,
        bn_momentum=0.1,
        print_table=False,
    )
    params = sum(p.numel() for p in task.model.parameters())
    print(
        f"[demo] LR-ASPP MobileNetV3-{args.arch.capitalize()} x{args.width} ({params / 1e6:.2f}M "
        f"params), {args.epochs} epochs, crops {args.crop_height}x{2 * args.crop_height}, "
        f"batch {args.batch_size}, lr {args.lr}, {args.threads} thread(s)"
    )
    plots = PlotWriter(
        dirpath=out, num_images=args.num_pictures, sheet_name="demo_segmentation.png"
    )
    trainer = L.Trainer(
        plugins=[AtomicCheckpointIO()],  # the CLI's checkpoint writer
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        check_val_every_n_epoch=max(1, args.epochs // 4),
        num_sanity_val_steps=0,
        logger=CSVLogger(out, name="logs"),
        callbacks=[
            ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0),
            plots,
        ],
        log_every_n_steps=10,
        enable_model_summary=False,
    )
    t_fit = time.perf_counter()
    trainer.fit(task, datamodule=data)
    t_fit = time.perf_counter() - t_fit
    trainer.validate(task, datamodule=data, verbose=False)
    results = task.last_results
    miou = float(results["miou"])

    # Overlays + label-id PNGs through the prediction writer (the sheet and charts: PlotWriter).
    writer = SegmentationPredictionWriter(out / "predictions")
    task.eval()
    val = data.val_dataset
    with torch.no_grad():
        for index in range(min(args.num_pictures, len(val))):
            image, _ = val[index]
            image_path, _ = val.files[index]
            pred = task(image[None]).argmax(1)[0].to(torch.uint8)
            rgb = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            name = f"{image_path.parent.name}/{image_path.name}"
            writer.write_item({"file_name": name, "pred": pred, "image": rgb})
    total = time.perf_counter() - start

    print(f"\n[demo] validation on {len(val)} generated scenes (per-class IoU, %):")
    print(results["table"])
    verdict = "reached" if miou >= TARGET_MIOU else "NOT reached"
    print(
        f"\n[demo] mIoU over the classes present: {100 * miou:.2f} (target {100 * TARGET_MIOU:.0f}: "
        f"{verdict}); pixel accuracy {100 * float(results['pixel_acc']):.2f}"
    )
    print(
        f"[demo] time: {total:.0f} s total (data {t_data:.0f} s, training {t_fit:.0f} s, "
        f"{trainer.global_step} steps)"
    )
    print(
        f"[demo] wrote overlays and label-id PNGs under {out / 'predictions'}, last.ckpt under "
        f"{out / 'checkpoints'}"
    )
    plots.print_written(
        {
            "demo_segmentation.png": "image | ground truth | prediction | overlay",
            "IoU_per_class.png": "IoU per class",
            "confusion_matrix_normalized.png": "confusion matrix, rows = ground truth",
            "results.png": "training curves",
        }
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
