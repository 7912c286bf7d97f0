"""What every trainer the ``mnv3det`` command builds gets, whatever its config says.

:func:`install_run_guards` runs on the constructed ``Trainer`` (see
:class:`mnv3det.cli.lightning_cli.MnV3DetCLI`): checkpoints are written atomically
(:class:`~mnv3det.tasks.checkpoint_io.AtomicCheckpointIO`), and ``sync_batchnorm`` is switched
off where torch's SyncBatchNorm cannot run (CPU processes), with a line saying so, so that the
shipped configs run unedited on a CPU and under CPU DDP.
"""

from __future__ import annotations

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info

from mnv3det.tasks.checkpoint_io import AtomicCheckpointIO

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


def install_run_guards(trainer: L.Trainer) -> L.Trainer:
    """Atomic checkpoint files and a ``sync_batchnorm`` that can run, on ``trainer``.

    Args:
        trainer: a freshly constructed trainer (before ``fit``/``validate``/...).

    Returns:
        The same trainer.
    """
    _atomic_checkpoints(trainer)
    _sync_batchnorm_where_it_runs(trainer)
    return trainer
