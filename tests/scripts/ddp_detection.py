"""Validate an SSDLite checkpoint on a COCO-format folder with N CPU processes (DDP test).

Used by tests/test_detection_task.py: run once with ``--devices 1`` and once with ``--devices 2``
(``strategy="ddp"``, which re-launches this script per rank); rank 0 writes the 12 COCO numbers
(and how many images each rank evaluated) to ``--out`` as JSON.
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
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--split", default="val2017")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    from mnv3det.tasks.detection import DetectionTask
    from mnv3det.tasks.detection_data import CocoDataModule

    task = DetectionTask(
        "small", num_classes=5, size=args.size, weights=args.weights, print_table=False
    )
    data = CocoDataModule(
        args.root, size=args.size, batch_size=2, num_workers=0, augment=False, val_split=args.split
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
        with open(args.out, "w") as f:
            json.dump({"world_size": trainer.world_size, **task.last_results["val"]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
