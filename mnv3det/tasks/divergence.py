"""A non-finite loss stops the run with the step and the image files of that batch, or skips
the step when asked; non-finite weights are never written to a checkpoint.

Both tasks pass their training loss through :func:`checked_loss` with their
``nonfinite_loss`` hyper-parameter (``--model.nonfinite_loss raise|skip``):

* ``raise`` (default, as torchvision's reference scripts, which stop on a non-finite loss):
  :class:`NonFiniteLossError` names the step, the loss and the batch's image files; the weights
  are those before the step (the error comes before the backward pass), and ``mnv3det fit``
  prints it as one line and exits with status 2;
* ``skip``: the training step returns ``None``, Lightning's own way of skipping the backward
  pass and the optimiser step, with one line per skipped step (under DDP, where Lightning
  refuses ``None``, a loss with zero gradients instead: the optimiser's momentum and weight
  decay still move the weights that step), and the BatchNorm statistics that the batch's forward
  pass changed are put back; when the weights themselves are no longer finite, or more than
  :data:`MAX_SKIPS_IN_A_ROW` steps in a row are not, no later step can recover, so that is an
  error too.

Under DDP the ranks agree first (any rank's non-finite loss is every rank's), so they skip or
stop at the same step.

:class:`NonFiniteGuard` (installed by the ``mnv3det`` command) checks the weights of every
checkpoint before it is written: a finite loss can still step to infinite weights (a huge
learning rate), and ``last.ckpt`` or a best checkpoint must never hold them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DistributedSampler

__all__ = [
    "MAX_SKIPS_IN_A_ROW",
    "NONFINITE_POLICIES",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "NonFinitePolicyError",
    "NonFiniteWeightsError",
    "batch_files",
    "buffers_before_step",
    "check_nonfinite_policy",
    "checked_loss",
]

NONFINITE_POLICIES = ("raise", "skip")
MAX_SKIPS_IN_A_ROW = 10
"""``skip``: more non-finite steps in a row than this stop the run (it diverged)."""
_MAX_NAMES = 8  # file names listed in one line; the rest are counted
_FIX = "lower model.lr, set trainer.gradient_clip_val, or check those files' annotations"


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite (``nonfinite_loss: raise``)."""


class NonFinitePolicyError(ValueError):
    """``nonfinite_loss`` is neither ``"raise"`` nor ``"skip"``."""


class NonFiniteWeightsError(ValueError):
    """The weights became NaN or infinite; nothing of that state is written."""


def check_nonfinite_policy(value: str, owner: str) -> str:
    """``value`` if it is ``"raise"`` or ``"skip"``, else a ``ValueError`` naming ``owner``."""
    if value not in NONFINITE_POLICIES:
        raise NonFinitePolicyError(
            f"{owner}: nonfinite_loss must be one of {NONFINITE_POLICIES}, got {value!r}"
        )
    return value


def _train_loader(trainer: L.Trainer) -> Any:
    loader = trainer.train_dataloader
    if isinstance(loader, Sequence) and not isinstance(loader, torch.utils.data.DataLoader):
        loader = loader[0] if loader else None
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    return loader


def _image_ids(batch: Any) -> list[int] | None:
    """``image_id`` of each target of a detection batch ``(images, targets)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        return None
    targets = batch[1]
    if not isinstance(targets, (tuple, list)) or not targets:
        return None
    ids = [t.get("image_id") if isinstance(t, Mapping) else None for t in targets]
    if any(i is None for i in ids):
        return None
    return [int(i.item() if isinstance(i, Tensor) else i) for i in ids]


def _batch_indices(loader: Any, batch_idx: int) -> list[int] | None:
    """The data set indices of batch ``batch_idx`` of this epoch, from the loader's sampler.

    The training sampler (:class:`mnv3det.data.sampling.ResumableSampler`) is a function of the
    seed and the epoch, so the batch's order is recomputed here; ``batch_idx`` counts from the
    epoch's start also after a mid-epoch resume.
    """
    sampler = getattr(loader, "sampler", None)
    batch_size = getattr(loader, "batch_size", None)
    if not isinstance(sampler, DistributedSampler) or not batch_size:
        return None
    order = list(DistributedSampler.__iter__(sampler))  # the whole epoch, no resume skip
    return [int(i) for i in order[batch_idx * batch_size : (batch_idx + 1) * batch_size]]


def _file_of_index(dataset: Any, index: int) -> str | None:
    files = getattr(dataset, "files", None)
    if isinstance(files, Sequence) and 0 <= index < len(files):  # Cityscapes: (image, label)
        item = files[index]
        return str(item[0] if isinstance(item, tuple) else item)
    ids = getattr(dataset, "ids", None)
    if isinstance(ids, Sequence) and 0 <= index < len(ids):
        return _file_of_image_id(dataset, ids[index])
    return None


def _file_of_image_id(dataset: Any, image_id: int) -> str | None:
    coco = getattr(dataset, "coco", None)
    info = getattr(coco, "imgs", {}).get(image_id) if coco is not None else None
    if not info or "file_name" not in info:
        return None
    folder = getattr(dataset, "image_dir", None)
    return str(Path(folder) / info["file_name"]) if folder is not None else info["file_name"]


def batch_files(trainer: L.Trainer, batch: Any, batch_idx: int) -> list[str]:
    """The image files of a training batch, as far as they can be found (else ``[]``).

    Detection batches carry each image's COCO ``image_id``; for the others the indices are
    recomputed from the training sampler.
    """
    return _files(trainer, _image_ids(batch), batch_idx)


def _files(trainer: L.Trainer, ids: list[int] | None, batch_idx: int) -> list[str]:
    loader = _train_loader(trainer)
    dataset = getattr(loader, "dataset", None)
    names: list[str | None] = []
    if ids is not None and getattr(dataset, "coco", None) is not None:
        names = [_file_of_image_id(dataset, i) for i in ids]
    else:
        indices = _batch_indices(loader, batch_idx)
        if indices is not None and dataset is not None:
            names = [_file_of_index(dataset, i) for i in indices]
    return [n for n in names if n is not None]


def _describe_files(files: list[str]) -> str:
    if not files:
        return "(file names not known for this data loader)"
    shown = ", ".join(files[:_MAX_NAMES])
    more = len(files) - _MAX_NAMES
    return shown + (f" (and {more} more)" if more > 0 else "")


def first_nonfinite(tensors: Mapping[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or infinity (``None``: none)."""
    names = [k for k, v in tensors.items() if isinstance(v, Tensor) and v.is_floating_point()]
    if not names:
        return None
    # one device sync for all tensors, not one per tensor
    finite = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).cpu()
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None


def _where(trainer: L.Trainer, batch_idx: int) -> str:
    return f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})"


def buffers_before_step(module: torch.nn.Module, policy: str) -> list[Tensor] | None:
    """With ``policy == "skip"``: a copy of the module's buffers, to pass to :func:`checked_loss`.

    A training forward pass updates the BatchNorm running statistics; a batch with a NaN loss
    usually leaves NaN in them, so skipping the optimiser step alone does not undo that batch.
    The copy is small (per-channel statistics) and taken only when steps may be skipped.
    """
    if policy != "skip":
        return None
    return [b.detach().clone() for b in module.buffers()]


def checked_loss(
    module: L.LightningModule,
    loss: Tensor,
    batch: Any,
    batch_idx: int,
    policy: str,
    buffers: list[Tensor] | None = None,
) -> Tensor | None:
    """``loss``, or ``None`` (skip the step) / an error when it is not finite.

    Args:
        module: the task (its trainer says the step; its weights are checked on a bad loss).
        loss: the training loss of the batch.
        batch: the batch, for the image files named in the message.
        batch_idx: its index in the epoch.
        policy: ``"raise"`` or ``"skip"``.
        buffers: :func:`buffers_before_step` of the step; a skipped step puts them back.

    Returns:
        ``loss`` when finite; ``None`` when not and ``policy`` is ``"skip"`` (the training step
        returns it, so Lightning skips the backward pass and the optimiser step), a loss with
        zero gradients under DDP.

    Raises:
        NonFiniteLossError: not finite and ``policy`` is ``"raise"``.
        NonFiniteWeightsError: not finite because the weights are not (any policy).
    """
    bad = not bool(torch.isfinite(loss.detach()).all())
    trainer = module._trainer
    if trainer is None:
        if bad and policy == "raise":
            raise NonFiniteLossError(f"the training loss is {loss.item()}; {_FIX}")
        return None if bad else loss
    here = bad
    if trainer.world_size > 1:
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # all ranks alike
    if not bad:
        module._nonfinite_in_a_row = 0  # type: ignore[attr-defined]
        return loss
    in_a_row = getattr(module, "_nonfinite_in_a_row", 0) + 1
    module._nonfinite_in_a_row = in_a_row  # type: ignore[attr-defined]
    value = loss.detach().float().item()
    where = _where(trainer, batch_idx)
    files = _describe_files(batch_files(trainer, batch, batch_idx))
    if not here:  # under DDP: another process's batch (its own message names the files)
        files = f"the batch of another process (this process's was finite: {files})"
    broken = first_nonfinite(dict(module.named_parameters()))
    if broken is not None:
        raise NonFiniteWeightsError(
            f"{where}: the loss is {value} because the weights are already non-finite "
            f"({broken}): an earlier step diverged (this batch: {files}); {_FIX}, and resume "
            "from a checkpoint before it (--ckpt_path FILE)"
        )
    if policy == "skip" and in_a_row > MAX_SKIPS_IN_A_ROW:
        raise NonFiniteLossError(
            f"{where}: the loss is {value} on {files}, and was not finite for the "
            f"{in_a_row - 1} steps before (skipped): the run diverged; {_FIX}, and resume "
            "from a checkpoint before it (--ckpt_path FILE)"
        )
    if policy == "skip":
        if buffers is not None:
            with torch.no_grad():
                for now, before in zip(module.buffers(), buffers, strict=True):
                    now.copy_(before)
        rank_zero_info(
            f"[run] {where}: the loss is {value} on {files}; step skipped (nonfinite_loss: skip)"
        )
        if trainer.world_size > 1:
            # Lightning refuses a None step under DDP: a loss with zero gradients keeps the
            # ranks' gradient all-reduce in step (momentum and weight decay still apply)
            return sum((p * 0.0).sum() for p in module.parameters() if p.requires_grad)
        return None
    raise NonFiniteLossError(
        f"{where}: the loss is {value} on the images {files}; {_FIX}, or pass "
        "--model.nonfinite_loss skip to skip such steps"
    )


class NonFiniteGuard(L.Callback):
    """Refuse to write a checkpoint whose weights are not finite (:class:`NonFiniteWeightsError`).

    The check runs in ``on_save_checkpoint``, before any checkpoint callback writes the file
    (:class:`~mnv3det.tasks.checkpoints.LastCheckpoint` takes its state in the same call), so
    ``last.ckpt`` and the best checkpoints keep their previous, finite state. The error names
    the step and the image files of the last batch trained on.
    """

    def __init__(self) -> None:
        self._last_batch: tuple[list[int] | None, int] | None = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # only what names the files: a detection batch's image ids, and the position
        self._last_batch = (_image_ids(batch), batch_idx)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("state_dict")
        if not isinstance(state, Mapping):
            return
        broken = first_nonfinite(state)
        if broken is None:
            return
        files = "(no training batch yet)"
        batch_idx = -1
        if self._last_batch is not None:
            ids, batch_idx = self._last_batch
            files = _describe_files(_files(trainer, ids, batch_idx))
        step = f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})"
        raise NonFiniteWeightsError(
            f"{step}: the weights became non-finite ({broken}) after training on {files}; "
            f"the checkpoint was not written (the previous ones are intact); {_FIX}"
        )
