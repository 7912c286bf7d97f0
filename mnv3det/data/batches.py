"""Compact training batches: uint8 images, stacked in shared memory by the loader's workers and
scaled to [0, 1] after they reach the training device.

A detection training image leaves the augmentation as ``size x size`` uint8 pixels. Sending it
as float32 quadruples what the workers copy into shared memory, what the main process maps and
what goes to the device; stacking the batch in the worker (``default_collate`` writes the stack
straight into one shared-memory block) replaces one block per image by one per batch. The
division by 255 moves to the device (:func:`images_to_float`, called from the data module's
``on_after_batch_transfer``), where it is the same arithmetic on the same values, so training
sees bit-identical inputs. The same idea as timm's prefetching loader and FFCV / DALI
pipelines; measured by ``tools/input_pipeline_benchmark.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from mnv3det.data.coco import collate_detection

__all__ = ["collate_stacked", "images_to_float"]


def collate_stacked(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor | list[torch.Tensor], list[dict[str, Any]]]:
    """:func:`mnv3det.data.coco.collate_detection` (``(images, targets)`` lists, unreadable items
    left out), with the images stacked into one ``(N, 3, H, W)`` tensor when they share one
    shape (training images, all resized to the model size).

    ``default_collate`` is used for the stack because inside a DataLoader worker it allocates the
    result directly in shared memory (no second copy when the batch is sent to the main process).
    """
    images, targets = collate_detection(batch)
    if images and all(image.shape == images[0].shape for image in images):
        return default_collate(images), targets
    return images, targets


def images_to_float(images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """uint8 images (a batch tensor or a list) -> float32 in [0, 1]; float images are returned
    unchanged. Runs where the batch already is (the training device)."""
    if isinstance(images, torch.Tensor):
        return images.float().div_(255.0) if images.dtype == torch.uint8 else images
    return [images_to_float(image) for image in images]
