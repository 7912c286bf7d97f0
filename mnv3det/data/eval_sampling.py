"""Evaluation and prediction order under DDP: every image once, on exactly one process.

``DistributedSampler`` (what Lightning puts on an evaluation loader under DDP) pads the data set
with repeated images so that every process gets the same number; a summed metric (the
confusion matrix of mIoU) then counts those images twice, and two processes disagree with one.
:class:`UnpaddedDistributedSampler` splits the data set without padding: ranks may get one batch
more or less, which evaluation allows (no gradient synchronisation; metrics sync once at the end).
Being a ``DistributedSampler``, Lightning keeps it instead of replacing it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["EvalSetTooSmallError", "UnpaddedDistributedSampler", "eval_sampler"]


class EvalSetTooSmallError(ValueError):
    """An evaluation set with fewer images than processes (some process would have none)."""


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``w`` takes indices ``r, r + w, r + 2w, ...`` of the data set, in order.

    Args:
        dataset: the data set (its length is read).
        num_replicas: number of processes (default: the process group's size).
        rank: this process's rank (default: the process group's rank).
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.total_size = len(dataset)  # type: ignore[arg-type]
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def eval_sampler(dataset: Dataset, name: str = "evaluation") -> UnpaddedDistributedSampler | None:
    """An :class:`UnpaddedDistributedSampler` when a process group is running, else ``None``.

    Args:
        dataset: the evaluation or prediction set.
        name: what it is, for the error message (``"val"``, ``"test"``, ``"predict"``).

    Raises:
        EvalSetTooSmallError: fewer images than processes. Lightning refuses a process without
            batches, and giving it a repeated image would count that image twice.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    world, size = dist.get_world_size(), len(dataset)  # type: ignore[arg-type]
    if size < world:
        raise EvalSetTooSmallError(
            f"the {name} set has {size} image{'s' * (size != 1)}, fewer than the {world} "
            f"processes (each needs at least one); run with --trainer.devices {max(1, size)} "
            "or add images"
        )
    return UnpaddedDistributedSampler(dataset)
