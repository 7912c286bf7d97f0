"""The run folder of a trainer, found without a collective call.

Lightning's ``Trainer.log_dir`` broadcasts rank 0's answer to every rank: called by rank 0 alone
(by a callback that writes pictures or reports only there) it waits forever for the other ranks
under DDP. The loggers of one run are pinned to one folder on every rank
(:mod:`mnv3det.cli.runs`), so each rank can compute the same answer locally.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

__all__ = ["run_folder"]


def run_folder(trainer: L.Trainer) -> Path:
    """``trainer.log_dir`` without its broadcast: safe to call on one rank.

    Args:
        trainer: the running trainer.

    Returns:
        The first logger's ``log_dir`` (CSV/TensorBoard) or ``save_dir``, else
        ``trainer.default_root_dir``, as Lightning's ``Trainer.log_dir`` chooses.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        folder = (
            logger.log_dir
            if isinstance(logger, (TensorBoardLogger, CSVLogger))
            else logger.save_dir
        )
        if folder:
            return Path(folder)
    return Path(trainer.default_root_dir)
