"""Validate an LR-ASPP checkpoint on a Cityscapes-format folder with N CPU processes (DDP test).

Used by tests/test_segmentation_task.py: run once with ``--devices 1`` and once with
``--devices 2`` (``strategy="ddp"``, which re-launches this script per rank); rank 0 writes the
accumulated confusion matrix and mIoU to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import lightning as L
import torch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    from mnv3det.tasks.segmentation import SegmentationTask
    from mnv3det.tasks.segmentation_data import CityscapesDataModule

    task = SegmentationTask(arch="small", width_mult=0.5, print_table=False)
    task.model.load_weights(args.weights)
    data = CityscapesDataModule(
        args.root, batch_size=1, val_batch_size=1, num_workers=0, pin_memory=False
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(task, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        results = task.last_results
        with open(args.out, "w") as f:
            json.dump(
                {
                    "world_size": trainer.world_size,
                    "confmat": results["confmat"].tolist(),
                    "miou": float(results["miou"]),
                    "pixel_acc": float(results["pixel_acc"]),
                },
                f,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
