"""Training order and augmentation randomness that a resumed run reproduces exactly.

A run killed and resumed from ``last.ckpt`` must train on the same images in the same order with
the same augmentation as an uninterrupted one. Three things make that hold, whatever the number
of DataLoader workers and wherever the run was stopped:

* :class:`ResumableSampler` (a ``DistributedSampler``, so Lightning keeps it under DDP) draws the
  epoch's order from ``(seed, epoch)`` alone and yields keys ``(index, sample_seed)`` where
  ``sample_seed`` is derived from ``(seed, epoch, index)``. The data sets reseed their
  albumentations pipeline with it before augmenting (:func:`split_key`), so an image's
  augmentation depends on nothing else: not on the worker that loads it, nor on how many images
  that worker loaded before.
* :class:`ResumableDataLoader` counts the batches it has handed to the training loop and
  implements ``state_dict`` / ``load_state_dict``; on resume the sampler then skips the batches
  already trained on (mid-epoch checkpoints) or moves on to the next epoch (end-of-epoch
  checkpoints). The skip applies only to the checkpoint's epoch: Lightning, which knows where
  its epochs end (``limit_train_batches`` ends them early), sets the sampler's epoch before the
  first batch, so a checkpoint taken at the last batch of a shortened epoch resumes at the next
  epoch's first batch. The data modules keep that state in the checkpoint through
  :class:`ResumableTrainData` (Lightning's own loader-state restore comes too late when the
  optimiser schedule asks for ``estimated_stepping_batches``, which builds the loader before
  the training state is restored).
* The sampler's seed is stored in that state, so a resumed run keeps its order and
  augmentations even when the global seed is not set.

Hand-written because torch's ``StatefulDataLoader`` lives in ``torchdata`` (an extra dependency)
and restores worker RNG states rather than making augmentation a function of the sample; this is
smaller and independent of the number of workers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "ResumableDataLoader",
    "ResumableSampler",
    "ResumableTrainData",
    "TrainSetTooSmallError",
    "default_seed",
    "reseed_transforms",
    "resumable_loader",
    "split_key",
]

SampleKey = tuple[int, int]
"""What :class:`ResumableSampler` yields: ``(dataset index, augmentation seed)``."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample's augmentation, a function of ``(seed, epoch, index)``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def split_key(key: int | SampleKey) -> tuple[int, int | None]:
    """``index`` or ``(index, seed)`` (from :class:`ResumableSampler`) -> ``(index, seed or None)``."""
    if isinstance(key, (tuple, list)):
        index, seed = key
        return int(index), int(seed)
    return int(key), None


def reseed_transforms(transforms: Any, seed: int | None) -> None:
    """Reseed an albumentations pipeline for one sample (no-op for ``None`` or plain callables)."""
    if seed is not None and hasattr(transforms, "set_random_seed"):
        transforms.set_random_seed(seed)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Epoch order from ``(seed, epoch)``; yields ``(index, sample_seed)`` keys.

    Works in one process and under DDP (each rank takes its share, as ``DistributedSampler``).
    Lightning calls :meth:`set_epoch` at the start of every epoch.

    Args:
        dataset: the data set (its length is read).
        shuffle: random order per epoch (training) or the data set's order.
        seed: seed of the order and of every sample's augmentation seed.
        drop_last: drop the tail so every rank gets the same number of samples (DDP only).
    """

    def __init__(
        self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
        num_replicas, rank = _world()
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=int(seed),
            drop_last=drop_last,
        )
        self.skip = 0
        """Samples of epoch :attr:`skip_epoch` to leave out once (set when resuming mid-epoch)."""
        self.skip_epoch: int | None = None
        """The epoch :attr:`skip` belongs to: an iteration of any other epoch skips nothing."""

    def pending_skip(self) -> int:
        """The samples the next iteration leaves out: :attr:`skip` if it is of this epoch."""
        return self.skip if self.epoch == self.skip_epoch else 0

    def __iter__(self) -> Iterator[SampleKey]:
        indices = list(super().__iter__())
        # Lightning sets the epoch it runs before the first batch: when it decided that the
        # checkpoint ended an epoch (its last batch, also one shortened by limit_train_batches)
        # it runs the next one, whose order starts at its first sample.
        skip, self.skip, self.skip_epoch = self.pending_skip(), 0, None
        for index in indices[skip:]:
            yield index, sample_seed(self.seed, self.epoch, index)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that Lightning can checkpoint.

    ``state_dict()`` is ``{"epoch", "batches", "num_batches", "seed"}``: the batches of the
    current epoch already handed out. Lightning saves it with every checkpoint and calls
    ``load_state_dict`` on resume, before creating the iterator.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._batches = 0

    @property
    def resumable_sampler(self) -> ResumableSampler:
        return self.sampler  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.resumable_sampler
        batch_size = self.batch_size or 1
        # runs at the first next(), after Lightning's set_epoch, like the sampler's own iteration
        self._batches = sampler.pending_skip() // batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where this epoch's iteration stands (saved in Lightning checkpoints)."""
        sampler = self.resumable_sampler
        return {
            "epoch": int(sampler.epoch),
            "batches": int(self._batches),
            "num_batches": len(self),
            "seed": int(sampler.seed),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the batches recorded in ``state`` (called by Lightning on resume)."""
        sampler = self.resumable_sampler
        if int(state["seed"]) != sampler.seed:
            sampler.seed = int(state["seed"])  # the checkpointed run's order, not a new one
        if int(state["num_batches"]) != len(self):
            warnings.warn(
                f"resuming with {len(self)} batches per epoch, the checkpoint had "
                f"{state['num_batches']} (data set or batch size changed): the epoch restarts "
                "from its first batch and the run will not equal an uninterrupted one",
                stacklevel=2,
            )
            sampler.set_epoch(int(state["epoch"]))
            sampler.skip = 0
        elif int(state["batches"]) >= len(self):  # saved at the end of a whole epoch
            sampler.set_epoch(int(state["epoch"]) + 1)
            sampler.skip = 0
        else:
            # Saved mid-epoch, or at the end of an epoch that limit_train_batches shortened: the
            # skip is kept for this epoch only. Lightning sets the epoch it resumes before the
            # first batch (the next one in the second case, which then starts from its first
            # batch); a loop of one's own over the loader continues this epoch.
            sampler.set_epoch(int(state["epoch"]))
            sampler.skip = int(state["batches"]) * (self.batch_size or 1)
        sampler.skip_epoch = sampler.epoch
        self._batches = sampler.pending_skip() // (self.batch_size or 1)


class TrainSetTooSmallError(ValueError):
    """The training images of one process do not fill one batch (nothing would be trained)."""


def epoch_plan(size: int, batch_size: int, world: int = 1, short_set_ok: bool = False) -> str:
    """What one training epoch uses of ``size`` images: one line for the ``[data]`` report.

    Every full batch is trained on and the incomplete last batch is left out (``drop_last``, as
    in torchvision's detection recipe: BatchNorm fails on a batch of one image, and a small
    last batch would be a noisy step). The order is shuffled every epoch, so the images left
    out differ from epoch to epoch. Under DDP every process takes ``ceil(size / world)`` images,
    ``DistributedSampler`` repeating a few to make the shares equal.

    Args:
        size: images in the training set.
        batch_size: images per batch (per process).
        world: number of processes.
        short_set_ok: a share smaller than one batch is trained as one short batch (else
            :class:`TrainSetTooSmallError`).

    Raises:
        TrainSetTooSmallError: a process's share is smaller than one batch and not
            ``short_set_ok``.
    """
    share = math.ceil(size / world)
    images = f"{size} image{'s' if size != 1 else ''}"
    if world > 1:
        repeated = share * world - size
        extra = f", {repeated} repeated to make them equal" if repeated else ""
        images += f" over {world} processes ({share} each{extra})"
        per = " per process"
    else:
        per = ""
    if share < batch_size:
        if short_set_ok:
            return f"train: {images}, batch {batch_size}: 1 batch of {share} per epoch{per}"
        raise TrainSetTooSmallError(
            f"the training set has {images}, fewer than data.batch_size {batch_size}{per}: "
            "training leaves the incomplete last batch out (BatchNorm needs more than one image "
            f"per batch), so nothing would be trained; set --data.batch_size {share} or lower, "
            "or add training images"
        )
    batches, tail = divmod(share, batch_size)
    text = f"train: {images}, batch {batch_size}: {batches} batch{'es' if batches != 1 else ''}"
    text += f" per epoch{per}"
    if not tail:
        return text + ", every image used"
    whose = "each process's share of the epoch" if world > 1 else "each epoch's order"
    return (
        f"{text}, the last {tail} image{'s' if tail != 1 else ''} of {whose} "
        f"{'are' if tail != 1 else 'is'} left out (drop_last, as torchvision's recipe; "
        "the order is shuffled, so other images each epoch)"
    )


class ResumableTrainData:
    """Mixin for data modules: checkpoint the training loader's position.

    Lightning saves ``datamodule.state_dict()`` in every checkpoint and calls
    ``load_state_dict`` before any DataLoader is built on resume; the state is applied to the
    next training loader made by :meth:`make_train_loader`.
    """

    seed: int | None = None
    """Seed of the training order and augmentation (drawn by :func:`default_seed` if unset)."""
    train_plan: str = ""
    """What an epoch uses of the training set (:func:`epoch_plan`), once a loader is made."""
    _train_loader: ResumableDataLoader | None = None
    _pending_loader_state: dict[str, int] | None = None

    def make_train_loader(
        self,
        dataset: Dataset,
        batch_size: int,
        short_set: Literal["error", "one_batch"] = "error",
        report: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> ResumableDataLoader:
        """A shuffled :class:`ResumableDataLoader` at the checkpointed position, if any.

        The incomplete last batch of every epoch is left out (see :func:`epoch_plan`).

        Args:
            dataset: the training set.
            batch_size: images per batch (per process).
            short_set: a process's share smaller than one batch: ``"error"``
                (:class:`TrainSetTooSmallError`) or ``"one_batch"`` (trained as one short batch;
                for models whose BatchNorm sees more than one value per channel anyway).
            report: called with :attr:`train_plan` (e.g. to print it).
            **kwargs: passed to ``DataLoader`` (not ``drop_last``, decided here).

        Raises:
            TrainSetTooSmallError: see ``short_set``.
        """
        if self.seed is None:
            self.seed = default_seed()
        world, _ = _world()
        # Under DDP every process gets ceil(len / world) samples (DistributedSampler pads by
        # repeating), so the batch count is per process, as Lightning counts it.
        self.train_plan = epoch_plan(len(dataset), batch_size, world, short_set == "one_batch")
        if report is not None:
            report(self.train_plan)
        drop_last = math.ceil(len(dataset) / world) >= batch_size
        loader = resumable_loader(
            dataset, batch_size, seed=self.seed, drop_last=drop_last, **kwargs
        )
        if self._pending_loader_state is not None:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """``{"train_loader": ...}`` once training has started (Lightning checkpoint hook)."""
        return (
            {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the loader position of a checkpoint for the next training loader."""
        state = state_dict.get("train_loader")
        if state is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._pending_loader_state = state


def resumable_loader(
    dataset: Dataset, batch_size: int, seed: int, drop_last: bool = False, **kwargs: Any
) -> ResumableDataLoader:
    """A shuffled training :class:`ResumableDataLoader` (``kwargs`` go to ``DataLoader``)."""
    sampler = ResumableSampler(dataset, shuffle=True, seed=seed)
    return ResumableDataLoader(
        dataset, sampler=sampler, batch_size=batch_size, drop_last=drop_last, **kwargs
    )


def default_seed() -> int:
    """A sampler seed drawn from torch's generator (so ``seed_everything`` fixes it)."""
    return int(torch.randint(0, 2**31 - 1, ()))
