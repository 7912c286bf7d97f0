"""What every trainer the ``mnv3det`` command builds gets, whatever its config says.

:func:`install_run_guards` runs on the constructed ``Trainer`` (see
:class:`mnv3det.cli.lightning_cli.MnV3DetCLI`): checkpoints are written atomically
(:class:`~mnv3det.tasks.checkpoint_io.AtomicCheckpointIO`), and ``sync_batchnorm`` is switched
off where torch's SyncBatchNorm cannot run (CPU processes), with a line saying so, so that the
shipped configs run unedited on a CPU and under CPU DDP. SIGTERM/SIGUSR1 stop the run at the next
step boundary with ``last.ckpt`` written (:class:`~mnv3det.tasks.preemption.Preemption`), and no
checkpoint is written with non-finite weights
(:class:`~mnv3det.tasks.divergence.NonFiniteGuard`). A callback of those types in the config is
used instead of a default one.
"""

from __future__ import annotations

from typing import TypeVar

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from mnv3det.tasks.checkpoint_io import AtomicCheckpointIO
from mnv3det.tasks.divergence import NonFiniteGuard
from mnv3det.tasks.preemption import Preemption

__all__ = ["install_run_guards"]


def _atomic_checkpoints(trainer: L.Trainer) -> None:
    # only Lightning's default writer is replaced; a CheckpointIO plugin the user chose stays
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def _sync_batchnorm_where_it_runs(trainer: L.Trainer) -> None:
    strategy = trainer.strategy
    if getattr(strategy, "_layer_sync", None) is None:
        return
    if isinstance(trainer.accelerator, CUDAAccelerator):
        return
    strategy._layer_sync = None
    if trainer.world_size > 1:
        rank_zero_info(
            "[run] trainer.sync_batchnorm: off on the CPU (torch's SyncBatchNorm runs on GPUs "
            "only): each process's BatchNorm uses its own batch"
        )


C = TypeVar("C", bound=Callback)


def _add_callback(trainer: L.Trainer, callback: C) -> C:
    """``callback``, or the one of its type already in ``trainer.callbacks`` (the config's)."""
    found = next((c for c in trainer.callbacks if isinstance(c, type(callback))), None)
    if found is not None:
        return found
    # before the checkpoint callbacks, where Lightning sorts it at fit time anyway
    first_checkpoint = next(
        (i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)),
        len(trainer.callbacks),
    )
    trainer.callbacks.insert(first_checkpoint, callback)
    return callback


def _stop_on_signals(trainer: L.Trainer) -> None:
    _add_callback(trainer, Preemption()).install(trainer)


def install_run_guards(trainer: L.Trainer) -> L.Trainer:
    """Atomic checkpoint files, a ``sync_batchnorm`` that can run, a stop with ``last.ckpt`` on
    SIGTERM/SIGUSR1 and no checkpoint of non-finite weights, on ``trainer``.

    Args:
        trainer: a freshly constructed trainer (before ``fit``/``validate``/...).

    Returns:
        The same trainer.
    """
    _atomic_checkpoints(trainer)
    _sync_batchnorm_where_it_runs(trainer)
    _stop_on_signals(trainer)  # mnv3det.tasks.preemption
    _add_callback(trainer, NonFiniteGuard())  # mnv3det.tasks.divergence
    return trainer
