"""A run stopped inside a validation runs that validation again when resumed.

``last.ckpt`` is written as a validation starts, with the state from before it; Lightning took a
resume from it for "that validation is done" and skipped it, so its metrics row (and the
best-model callback's look at it) was lost. Deterministic: the run raises inside the chosen
validation, as a kill there would leave it, and the resumed run must validate at the same steps
as an uninterrupted one, with the same weights.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mnv3det.data.sampling import resumable_loader, split_key
from mnv3det.tasks.checkpoints import LastCheckpoint


class Numbers(torch.utils.data.Dataset):
    """12 fixed numbers, indexed by the resumable sampler's ``(index, seed)`` keys."""

    data = torch.linspace(-2, 3, 12).view(12, 1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):
        return self.data[split_key(key)[0]]


class Killed(Exception):
    """Stands for the kill."""


class Tiny(L.LightningModule):
    def __init__(self, die_in_validation_at: int | None = None) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)
        self.w = torch.nn.Parameter(torch.ones(1))
        self.die_at = die_in_validation_at
        self.validated_at: list[int] = []

    def training_step(self, batch, batch_idx):
        return (self.w * self.bn(batch)).square().mean()

    def validation_step(self, batch, batch_idx):
        if self.global_step == self.die_at:
            raise Killed
        loss = (self.w * batch).square().mean()
        self.log("val/loss", loss)

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at.append(self.global_step)

    def train_dataloader(self):
        # the tasks' loader: a resumed run skips what it trained on (6 batches an epoch)
        return resumable_loader(Numbers(), batch_size=2, seed=0)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(4.0).view(4, 1), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def trainer(folder) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        val_check_interval=3,  # mid-epoch (step 3) and at the epoch end (step 6)
        default_root_dir=folder,
        logger=False,
        callbacks=[LastCheckpoint(dirpath=folder, every_n_train_steps=1)],
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("stopped_in", [3, 6, 9], ids=["mid-epoch", "epoch-end", "2nd-epoch"])
def test_validation_stopped_midway_runs_again_on_resume(tmp_path, stopped_in: int) -> None:
    straight = Tiny()
    trainer(tmp_path / "straight").fit(straight)
    assert straight.validated_at == [3, 6, 9, 12]

    killed = Tiny(die_in_validation_at=stopped_in)
    with pytest.raises(Killed):
        trainer(tmp_path / "broken").fit(killed)
    last = tmp_path / "broken" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stopped_in

    resumed = Tiny()
    trainer(tmp_path / "broken").fit(resumed, ckpt_path=last)
    assert killed.validated_at + resumed.validated_at == [3, 6, 9, 12]
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
