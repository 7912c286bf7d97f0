"""Per-worker reseeding of albumentations pipelines (shared by the COCO and Cityscapes loaders).

An ``A.Compose`` keeps its own random generator; forked DataLoader workers would otherwise all
start from the same copy of it (identical augmentations in every worker, and again every epoch
when workers are re-created). Reseeding from torch's per-worker seed (which changes per worker
and per epoch and follows ``seed_everything``) fixes both.
"""

from __future__ import annotations

import torch


def seed_worker_transforms(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: give each worker its own augmentation stream.

    Reseeds the ``transforms`` of the worker's dataset, unwrapping ``Subset``/``ConcatDataset``
    style wrappers; does nothing outside a worker.
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    stack = [info.dataset]
    while stack:
        dataset = stack.pop()
        transforms = getattr(dataset, "transforms", None)
        if hasattr(transforms, "set_random_seed"):
            transforms.set_random_seed(int(info.seed % 2**32))
        if hasattr(dataset, "dataset"):
            stack.append(dataset.dataset)
        stack.extend(getattr(dataset, "datasets", []))
