"""Lightning checkpoints: loadable with ``torch.load(weights_only=True)``, and a ``last.ckpt`` that
is always the newest state of the run (:class:`LastCheckpoint`).

:mod:`mnv3det.weights` refuses checkpoints that need arbitrary unpickling; a task's saved
hyper-parameters can hold ``pathlib.Path`` objects (e.g. the data module's ``root``) or mapping
subclasses, which ``weights_only`` loading rejects. Both tasks call :func:`make_checkpoint_safe`
from ``on_save_checkpoint`` so their checkpoints load through ``weights=`` and ``mnv3det export``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


def plain(value: Any) -> Any:
    """Paths -> str and mapping subclasses -> dict, recursively (safe-unpicklable types only)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value


def make_checkpoint_safe(checkpoint: dict[str, Any]) -> None:
    """Rewrite the hyper-parameters of a checkpoint dict in place with plain types."""
    for key in HPARAM_KEYS:
        if key in checkpoint:
            checkpoint[key] = plain(checkpoint[key])


def validation_still_to_run(checkpoint: dict[str, Any]) -> None:
    """Mark a state taken right before a validation so that a resume from it runs it again.

    The state is taken at ``on_train_batch_end`` and written as the validation that follows
    starts; Lightning would take a resume from it for "that validation is done" and skip it
    (its metrics row, and the best-model callback's look at them, would be lost). Its loop
    progress is rewritten to what Lightning records for a checkpoint saved inside that
    validation before its first batch: the training batch completed, one validation batch
    started. Lightning then runs the validation first, from its first batch, and goes on.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    train = loops.get("epoch_loop.batch_progress")
    val = loops.get("epoch_loop.val_loop.batch_progress")
    if train is None or val is None:
        return
    for part in ("total", "current"):
        train[part]["completed"] = train[part]["processed"]
    done = val["total"]["completed"]
    val["total"].update(ready=done + 1, started=done + 1, processed=done, completed=done)
    val["current"].update(ready=1, started=1, processed=0, completed=0)


class LastCheckpoint(ModelCheckpoint):
    """Keep ``last.ckpt`` the newest state of the run, for ``--ckpt_path last``.

    Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when
    it saves a top-k checkpoint, so a run killed late resumes from its best epoch. This callback
    writes ``last.ckpt`` at the end of every training epoch (after its last batch, and again
    after the epoch-end validation when there is one) and, when asked, every
    ``every_n_train_steps`` optimiser steps, independently of any best-model
    callback. Files are written atomically by the CLI's
    :class:`~mnv3det.tasks.checkpoint_io.AtomicCheckpointIO` (a kill while saving leaves the
    previous ``last.ckpt`` intact, whatever ``TMPDIR`` is).

    The state is taken where Lightning resumes it exactly (``on_train_batch_end``), but Lightning
    logs that step's metrics only after the hook returns. The file is therefore written at the
    next point where nothing has changed the taken state yet and the step's row is already in
    the loggers' files (the next batch's start, validation start, epoch start or end, the end
    of training, an exception). A run killed in between resumes from the previous
    ``last.ckpt`` and logs the steps after it again, so ``metrics.csv`` never misses a step.

    Args:
        dirpath: folder of ``last.ckpt`` (``None``: the run folder's ``checkpoints/``, like
            every Lightning checkpoint callback).
        every_n_train_steps: also save every N optimiser steps within an epoch (0: only at
            epoch ends). A resumed run skips the batches already trained on
            (:mod:`mnv3det.data.sampling`), so mid-epoch saves resume exactly too.
    """

    def __init__(self, dirpath: str | Path | None = None, every_n_train_steps: int = 0) -> None:
        if every_n_train_steps < 0:
            raise ValueError(
                f"LastCheckpoint: every_n_train_steps must be >= 0, got {every_n_train_steps}"
            )
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        self.every_n_steps = every_n_train_steps
        self._validated_at_step: int | None = None
        self._pending: tuple[dict[str, Any], str] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kind="last", every_n_train_steps=self.every_n_steps)

    def _skip(self, trainer: L.Trainer) -> bool:
        return bool(
            trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != "fit"
            or self._last_global_step_saved == trainer.global_step
        )

    def _save_last(self, trainer: L.Trainer) -> None:
        # _save_checkpoint below records the step (self._last_global_step_saved)
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Take the state now (``Trainer.save_checkpoint``'s first half); write it later."""
        self._write_pending(trainer)
        self._pending = (
            trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only),
            filepath,
        )
        self._last_global_step_saved = trainer.global_step

    def save_now(self, trainer: L.Trainer) -> None:
        """Take the state now for ``last.ckpt`` (call from ``on_train_batch_end``, where Lightning
        resumes it exactly); it is written at the next safe hook or by :meth:`flush`."""
        if trainer.state.fn == "fit" and self._last_global_step_saved != trainer.global_step:
            self._save_last(trainer)

    def flush(self, trainer: L.Trainer) -> str | None:
        """Write the taken state, if any, now.

        Returns:
            The path of the ``last.ckpt`` written by this run so far (``None``: none yet).
        """
        self._write_pending(trainer)
        return self._last_checkpoint_saved or None

    @property
    def saved_step(self) -> int:
        """The global step of the state last taken for ``last.ckpt`` (0: none taken yet)."""
        return int(self._last_global_step_saved)

    def _write_pending(self, trainer: L.Trainer) -> None:
        """Write the taken state (``Trainer.save_checkpoint``'s second half) and tell the loggers.

        The taken dict holds references to the weights and optimiser buffers; every caller runs
        before anything can change them (the next optimiser step, forward pass or EMA update).
        """
        if self._pending is None:
            return
        checkpoint, filepath = self._pending
        self._pending = None
        trainer.strategy.save_checkpoint(checkpoint, filepath)
        trainer.strategy.barrier("LastCheckpoint.write")
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._write_pending(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            validation_still_to_run(self._pending[0])
        self._write_pending(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_pending(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_pending(trainer)
        super().on_train_end(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, OSError):
            # the failed write itself (e.g. a full disk): do not try again while it unwinds
            self._pending = None
        else:
            self._write_pending(trainer)
        super().on_exception(trainer, pl_module, exception)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._skip(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # The epoch's last batch is always saved here: Lightning resumes a checkpoint taken
            # at on_train_epoch_end correctly only when validation ran at that epoch end (else
            # it trains one batch too many), and one taken here correctly in every case.
            self._save_last(trainer)
            return
        if not self.every_n_steps:
            return
        stepped = (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0
        if stepped and trainer.global_step % self.every_n_steps == 0:
            self._save_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the step of the last validation (``last.ckpt`` is written at epoch end)."""
        if not trainer.sanity_checking:
            self._validated_at_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        step = trainer.global_step
        if self._last_global_step_saved != step or self._validated_at_step == step:
            # after this epoch's validation (its results and the best-model state are in the
            # checkpoint too), or the run stopped mid-epoch (max_steps)
            self._save_last(trainer)
