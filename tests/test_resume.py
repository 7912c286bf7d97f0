"""Kill -9 a real ``mnv3det fit`` mid-epoch, resume it with ``--ckpt_path last``, and compare
with an uninterrupted run: same final global step, bit-identical weights (CPU, fixed seed).

Both tasks run the shipped configs shrunk from the command line, with augmentation on, two
DataLoader workers, ``last.ckpt`` every step (so the kill lands after a mid-epoch save) and, for
detection, an EMA of the weights.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnv3det.cli.runs import find_last_checkpoint
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

COMMON = [
    *["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.benchmark", "false"],
    *["--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1"],
    *["--data.num_workers", "2", "--data.pin_memory", "false", "--seed_everything", "7"],
]


def config_saving_every_step(name: str, folder: Path) -> str:
    """The shipped config with ``LastCheckpoint(every_n_train_steps=1)``, as a user would edit it."""
    text = (REPO / "configs" / name).read_text()
    assert "every_n_train_steps: 0" in text
    path = folder / name
    path.write_text(text.replace("every_n_train_steps: 0", "every_n_train_steps: 1"))
    return str(path)


def detection_args(root: Path) -> list[str]:
    config = config_saving_every_step("ssdlite320_mnv3_small_coco.yaml", root.parent)
    return [
        *["--config", config, *COMMON],
        *["--data.root", str(root), "--data.label_map", "contiguous"],
        *["--data.batch_size", "4", "--data.zoom_out_max_scale", "2.0"],
        *["--data.photometric", "true", "--data.val_split", "val2017"],
        *["--model.num_classes", "5", "--model.size", "96", "--model.width_mult", "0.5"],
        *["--model.lr", "0.02", "--model.warmup_epochs", "1", "--model.ema_decay", "0.9"],
        *["--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "1"],
    ]


def segmentation_args(root: Path) -> list[str]:
    config = config_saving_every_step("lraspp_mnv3_small_cityscapes.yaml", root.parent)
    return [
        *["--config", config, *COMMON],
        *["--data.root", str(root), "--data.crop_size", "[64, 128]", "--data.batch_size", "2"],
        *["--data.val_batch_size", "2", "--model.width_mult", "0.5"],
        *["--trainer.max_steps", "14", "--trainer.val_check_interval", "4"],
    ]


def run(args: list[str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mnv3det.cli", "fit", *args, *extra],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no dependency noise a user cannot act on (mnv3det.cli.quiet)
    assert "litlogger" not in proc.stderr and "LeafSpec" not in proc.stderr
    return proc


def global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def run_and_kill(args: list[str], cwd: Path, logs: Path, steps_per_epoch: int) -> int:
    """Start a fit, SIGKILL it as soon as ``last.ckpt`` holds a step in the middle of an epoch
    after the first one (the process goes on training while it is being killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnv3det.cli", "fit", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, seen, step = time.monotonic() + 600, None, -1
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            last = find_last_checkpoint(logs)
            if last is not None and last.stat().st_mtime_ns != seen:
                seen = last.stat().st_mtime_ns
                step = global_step(last)
                if step > steps_per_epoch and step % steps_per_epoch:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself:\n{proc.stderr.read()}"
    return step


def metric_steps(path: Path) -> list[int]:
    with open(path, newline="") as file:
        return sorted({int(row["step"]) for row in csv.DictReader(file)})


def state_of(path: Path) -> tuple[int, dict[str, torch.Tensor], list]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"], ckpt["optimizer_states"]


def assert_same_run(killed: Path, uninterrupted: Path) -> None:
    step_a, weights_a, optim_a = state_of(uninterrupted)
    step_b, weights_b, optim_b = state_of(killed)
    assert step_a == step_b
    assert weights_a.keys() == weights_b.keys()
    max_diff = max(
        (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        for a, b in ((weights_a[k], weights_b[k]) for k in weights_a)
    )
    print(f"final step {step_a}, max weight difference {max_diff:g}")
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    momenta_a = [s["momentum_buffer"] for s in optim_a[0]["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in optim_b[0]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momenta_a, momenta_b, strict=True))


def kill_resume_compare(args: list[str], tmp_path: Path, name: str, steps_per_epoch: int) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir()
    broken.mkdir()
    run(args, straight)
    logs = broken / "logs" / name
    killed_at = run_and_kill(args, broken, logs, steps_per_epoch)
    last = find_last_checkpoint(logs)
    assert last is not None and last.parent.parent.name == "version_0"
    final_step = global_step(find_last_checkpoint(straight / "logs" / name))
    resumed_from = global_step(last)
    assert resumed_from < final_step, "killed too late to test a resume"
    proc = run(args, broken, "--ckpt_path", "last")
    assert "continuing from" in proc.stdout + proc.stderr
    assert "no last checkpoint" not in proc.stderr
    # one run, one folder: the resumed run wrote into version_0, no version_1 appeared
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    steps_logged = metric_steps(logs / "version_0" / "metrics.csv")
    # the history before the kill is kept (Lightning's CSVLogger would delete it)
    assert steps_logged == list(range(final_step)), steps_logged
    where = "mid-epoch" if resumed_from % steps_per_epoch else "at an epoch end"
    print(f"{name}: killed after step {killed_at}, resumed from step {resumed_from} ({where})")
    assert_same_run(
        logs / "version_0/checkpoints/last.ckpt",
        straight / "logs" / name / "version_0/checkpoints/last.ckpt",
    )


@pytest.mark.slow
def test_detection_fit_killed_mid_epoch_resumes_to_the_same_weights(tmp_path) -> None:
    root = generate_shapes_coco(
        tmp_path / "coco", num_train=24, num_val=4, image_size=(120, 96), seed=3
    )
    # 24 images / batch 4 = 6 steps per epoch, 3 epochs
    kill_resume_compare(detection_args(root), tmp_path, "ssdlite320_mnv3_small_coco", 6)


@pytest.mark.slow
def test_segmentation_fit_killed_mid_epoch_resumes_to_the_same_weights(tmp_path) -> None:
    root = generate_street_scenes(
        tmp_path / "cityscapes", cities=("aachen", "bremen"), per_city=5, size=(64, 128)
    )
    # 10 images / batch 2 = 5 steps per epoch; 14 steps; validation every 4 steps
    kill_resume_compare(segmentation_args(root), tmp_path, "lraspp_mnv3_small_cityscapes", 5)
