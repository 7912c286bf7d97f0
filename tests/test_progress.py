"""The progress bar's training line for epoch- and step-based runs."""

from __future__ import annotations

from types import SimpleNamespace

from mnv3det.tasks.progress import ProgressBar


def description(**trainer) -> str:
    bar = ProgressBar()
    bar._trainer = SimpleNamespace(**trainer)
    return bar._get_train_description(28)


def test_step_based_run_shows_steps_not_a_negative_epoch_count() -> None:
    text = description(max_epochs=-1, max_steps=320000, global_step=5208)
    assert text == "Epoch 28 · step 5208/320000"


def test_epoch_based_run_keeps_lightnings_text() -> None:
    assert description(max_epochs=660, max_steps=-1, global_step=0) == "Epoch 28/659"
