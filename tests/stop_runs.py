"""Real ``mnv3det fit`` subprocesses for the stop tests (signals, SLURM requeue, divergence,
full disk): the shipped detection config shrunk from the command line, on generated data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mnv3det.cli.runs import find_last_checkpoint
from mnv3det.data.synthetic_coco import generate_shapes_coco

REPO = Path(__file__).resolve().parents[1]
NAME = "ssdlite320_mnv3_small_coco"
STEPS_PER_EPOCH = 6  # 24 images, batch 4
# not a SLURM job, even when the tests run in one (the SLURM tests set their own variables)
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TIMEOUT_S = 300


def make_coco(folder: Path) -> Path:
    return generate_shapes_coco(folder, num_train=24, num_val=4, image_size=(120, 96), seed=3)


def fit_args(root: Path, *extra: str, config: str | None = None) -> list[str]:
    """Arguments of a tiny detection fit (6 steps per epoch, 4 epochs, validation at the end)."""
    return [
        *["--config", config or str(REPO / "configs" / f"{NAME}.yaml")],
        *["--trainer.accelerator", "cpu", "--trainer.devices", "1"],
        *["--trainer.benchmark", "false", "--trainer.num_sanity_val_steps", "0"],
        *["--trainer.log_every_n_steps", "1", "--trainer.max_epochs", "4"],
        *["--trainer.check_val_every_n_epoch", "4", "--seed_everything", "7"],
        *["--data.root", str(root), "--data.label_map", "contiguous", "--data.batch_size", "4"],
        *["--data.num_workers", "2", "--data.pin_memory", "false"],
        *["--model.num_classes", "5", "--model.size", "96", "--model.width_mult", "0.5"],
        *["--model.lr", "0.02", "--model.warmup_epochs", "1"],
        *extra,
    ]


def logs_of(cwd: Path) -> Path:
    return cwd / "logs" / NAME


def start_fit(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen:
    command = prefix or [sys.executable, "-m", "mnv3det.cli"]
    return subprocess.Popen(
        [*command, "fit", *args],
        cwd=cwd,
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,  # its own process group, for a signal to all of it
    )


def run_fit(args: list[str], cwd: Path, **kwargs) -> tuple[int, str]:
    return finish(start_fit(args, cwd, **kwargs))


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    """Poll ``ready`` until it holds; fail if the run ends first or the deadline passes."""
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {TIMEOUT_S} s")
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out


def last_step(cwd: Path) -> int:
    """The global step of the newest ``last.ckpt`` (-1: none)."""
    last = find_last_checkpoint(logs_of(cwd))
    return -1 if last is None else load(last)["global_step"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_lines(out: str) -> list[str]:
    """The ``[run]`` and ``mnv3det fit: error`` lines of an output."""
    return [line for line in out.splitlines() if re.match(r"\[run\]|mnv3det fit: error", line)]
