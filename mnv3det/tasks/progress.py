"""Lightning's Rich progress bar with the right epoch/step for step-based schedules.

Lightning prints ``Epoch 28/-2`` when training is given in steps (``max_epochs: -1``, as the
Cityscapes recipes do): its description is ``Epoch {current}/{max_epochs - 1}``. This bar
prints ``Epoch 28 · step 5208/320000`` there, and Lightning's text otherwise.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["ProgressBar"]


class ProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training line is right for step-based runs."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        steps = f" · step {trainer.global_step}"
        if trainer.max_steps and trainer.max_steps > 0:
            steps += f"/{trainer.max_steps}"
        return f"Epoch {current_epoch}{steps}"
