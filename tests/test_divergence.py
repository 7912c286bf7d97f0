"""A non-finite loss stops the run naming the step and the batch's image files (exit 2 from the
command), or skips the step with ``nonfinite_loss: skip``; no checkpoint ever holds non-finite
weights."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from stop_runs import REPO, fit_args, load, logs_of, make_coco, run_fit
from torch.utils.data import DataLoader

from mnv3det.data.sampling import ResumableSampler
from mnv3det.tasks.checkpoints import LastCheckpoint
from mnv3det.tasks.divergence import (
    MAX_SKIPS_IN_A_ROW,
    NonFiniteLossError,
    NonFinitePolicyError,
    NonFiniteWeightsError,
    _batch_indices,
    buffers_before_step,
    checked_loss,
)
from mnv3det.tasks.guards import install_run_guards


class Tiny(L.LightningModule):
    """BatchNorm and a weight on 8 numbers (4 steps of 2); the batches ``nan_at`` hold NaN, or
    the weight becomes infinite after the optimiser step of ``inf_after``."""

    batches = 4

    def __init__(self, policy: str, nan_at: tuple[int, ...] = (), inf_after: int = -1) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.bn = torch.nn.BatchNorm1d(1)
        self.policy, self.nan_at, self.inf_after = policy, nan_at, inf_after
        self.weights: list[float] = []  # after each batch
        self.running_means: list[float] = []

    def training_step(self, batch, batch_idx):
        buffers = buffers_before_step(self, self.policy)
        if batch_idx in self.nan_at:
            batch = batch * float("nan")  # NaN in the BatchNorm statistics too
        loss = (self.w * self.bn(batch)).square().mean()
        return checked_loss(self, loss, batch, batch_idx, self.policy, buffers)

    def optimizer_step(self, epoch, batch_idx, *args, **kwargs):
        super().optimizer_step(epoch, batch_idx, *args, **kwargs)
        if batch_idx == self.inf_after:
            self.w.data.fill_(math.inf)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights.append(float(self.w))
        self.running_means.append(float(self.bn.running_mean))

    def train_dataloader(self):
        return DataLoader(torch.arange(float(self.batches * 2)).view(-1, 1), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, module: Tiny) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="tiny"),
        callbacks=[LastCheckpoint(every_n_train_steps=1)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    install_run_guards(trainer)
    trainer.fit(module)
    return trainer


def last_ckpt(tmp_path: Path) -> dict:
    return load(tmp_path / "tiny/version_0/checkpoints/last.ckpt")


def assert_finite(checkpoint: dict) -> None:
    for name, value in checkpoint["state_dict"].items():
        assert torch.isfinite(value).all(), name


def test_nonfinite_loss_raises_naming_the_step_before_any_checkpoint_of_it(tmp_path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"^step 2 \(epoch 0, batch 2\): the loss is nan"):
        fit(tmp_path, Tiny("raise", nan_at=(2,)))
    checkpoint = last_ckpt(tmp_path)
    assert checkpoint["global_step"] == 2
    assert_finite(checkpoint)


def test_skip_policy_skips_the_step_and_goes_on(tmp_path, caplog) -> None:
    module = Tiny("skip", nan_at=(1,))
    fit(tmp_path, module)
    first, skipped, third, fourth = module.weights
    assert skipped == first and first != third != fourth  # no update from the NaN batch
    means = module.running_means
    assert means[1] == means[0] and all(math.isfinite(m) for m in means)  # BatchNorm put back
    assert "[run] step 1 (epoch 0, batch 1): the loss is nan" in caplog.text
    assert "step skipped (nonfinite_loss: skip)" in caplog.text
    assert_finite(last_ckpt(tmp_path))


def test_skip_policy_stops_a_run_that_only_skips(tmp_path) -> None:
    module = Tiny("skip", nan_at=tuple(range(2, 2 + MAX_SKIPS_IN_A_ROW + 1)))
    module.batches = MAX_SKIPS_IN_A_ROW + 4
    with pytest.raises(NonFiniteLossError, match=f"not finite for the {MAX_SKIPS_IN_A_ROW} steps"):
        fit(tmp_path, module)
    assert_finite(last_ckpt(tmp_path))


def test_weights_that_became_infinite_are_never_checkpointed(tmp_path) -> None:
    with pytest.raises(
        NonFiniteWeightsError, match=r"^step 2 \(epoch 0, batch 1\): the weights became non-finite"
    ):
        fit(tmp_path, Tiny("skip", inf_after=1))
    checkpoint = last_ckpt(tmp_path)
    assert checkpoint["global_step"] == 1
    assert_finite(checkpoint)


def test_unknown_policy_is_an_error() -> None:
    with pytest.raises(NonFinitePolicyError, match="nonfinite_loss must be one of"):
        from mnv3det.tasks.segmentation import SegmentationTask

        SegmentationTask(width_mult=0.5, nonfinite_loss="ignore")


def test_batch_indices_follow_the_sampler_also_after_a_mid_epoch_resume() -> None:
    sampler = ResumableSampler(range(10), seed=5)
    sampler.set_epoch(3)
    loader = DataLoader(range(10), sampler=sampler, batch_size=2)
    order = [index for index, _ in sampler]
    assert [_batch_indices(loader, i) for i in range(5)] == [
        order[i : i + 2] for i in (0, 2, 4, 6, 8)
    ]
    sampler.skip, sampler.skip_epoch = 4, 3  # resumed after two batches: batch_idx goes on at 2
    assert [index for index, _ in sampler][:2] == _batch_indices(loader, 2)


@pytest.mark.slow
def test_cli_fit_with_a_diverging_lr_stops_with_one_line_and_exit_2(tmp_path) -> None:
    root = make_coco(tmp_path / "coco")
    config = tmp_path / "every_step.yaml"
    text = (REPO / "configs" / "ssdlite320_mnv3_small_coco.yaml").read_text()
    config.write_text(text.replace("every_n_train_steps: 0", "every_n_train_steps: 1"))
    args = fit_args(root, "--model.lr", "1e8", "--model.warmup_epochs", "0", config=str(config))
    code, out = run_fit(args, tmp_path)
    errors = [line for line in out.splitlines() if line.startswith("mnv3det fit: error:")]
    print("\n".join(errors))
    assert code == 2, out[-3000:]
    assert len(errors) == 1 and "Traceback" not in out
    found = re.search(r"step (\d+) \(epoch 0, batch \d+\): the (loss|weights)", errors[0])
    assert found, errors[0]
    files = re.findall(r"(\S+\.jpg)", errors[0])
    assert files and all(Path(f.rstrip(",;")).is_file() for f in files)
    last = logs_of(tmp_path) / "version_0" / "checkpoints" / "last.ckpt"
    if last.exists():  # the state before the divergence
        checkpoint = load(last)
        assert checkpoint["global_step"] <= int(found.group(1))
        assert_finite(checkpoint)
