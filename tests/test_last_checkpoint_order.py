"""``last.ckpt`` appears on disk only after ``metrics.csv`` holds every step it covers.

A run killed right after ``last.ckpt`` of global step S was written resumes at step S, so the
rows of steps < S must already be in ``metrics.csv``: the resumed run never logs them again.
Lightning logs a step's metrics only after ``on_train_batch_end`` (where the state is taken),
so writing the file there lost the row of the checkpoint's last step to a kill in between (seen
in CI as a missing row in ``tests/test_resume.py``). This test checks the order on every write.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from mnv3det.tasks.checkpoints import LastCheckpoint
from mnv3det.tasks.loggers import CSVLogger


class TinyTask(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class WatchingCSVLogger(CSVLogger):
    """Reads ``last.ckpt`` and ``metrics.csv`` right after each checkpoint write.

    Checkpoint callbacks call ``after_save_checkpoint`` on the loggers as soon as the file is
    written, the moment a kill would find it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.observed: list[tuple[int, set[int]]] = []

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        path = Path(checkpoint_callback.last_model_path)
        step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
        metrics, rows = Path(self.log_dir) / "metrics.csv", set()
        if metrics.exists():
            with open(metrics, newline="") as file:
                rows = {int(r["step"]) for r in csv.DictReader(file) if r.get("train/loss_step")}
        self.observed.append((step, rows))


def test_last_checkpoint_is_written_after_the_rows_of_its_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 3), torch.randn(12, 1))
    logger = WatchingCSVLogger(save_dir=tmp_path, name="tiny", version=0)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=logger,
        callbacks=[LastCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)],
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyTask(), DataLoader(data, batch_size=3), DataLoader(data, batch_size=6))

    steps = [step for step, _ in logger.observed]
    # 4 steps per epoch, 3 epochs: one write per step plus one after each epoch's validation
    assert steps[0] == 1 and steps[-1] == 12 and sorted(set(steps)) == list(range(1, 13))
    for step, rows in logger.observed:
        assert set(range(step)) <= rows, f"last.ckpt of step {step} on disk before rows {rows}"
    final = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 12
    assert torch.equal(final["state_dict"]["layer.weight"], trainer.lightning_module.layer.weight)
