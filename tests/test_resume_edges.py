"""Two kills the resume matrix does not draw: one that lands while ``last.ckpt`` is being
rewritten (``TMPDIR`` on another file system), and one of a two-process DDP run.

Both resume with ``--ckpt_path last`` and must end bit-identical to an uninterrupted run of the
same command (CPU, fixed seed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from resume_runs import ENV, assert_same_run, config_saving_every_step, global_step, run

from mnv3det.cli.runs import find_last_checkpoint
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.tasks.checkpoint_io import TEMP_PREFIX

NAME = "ssdlite320_mnv3_small_coco"
LAST_TEMP = f"{TEMP_PREFIX}last.ckpt."


def detection_args(root: Path, folder: Path, *extra: str) -> list[str]:
    config = config_saving_every_step(f"{NAME}.yaml", folder)
    return [
        *["--config", config, "--data.root", str(root), "--data.label_map", "contiguous"],
        *["--trainer.accelerator", "cpu", "--trainer.benchmark", "false"],
        *["--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1"],
        *["--data.pin_memory", "false", "--seed_everything", "7", "--data.batch_size", "2"],
        *["--model.num_classes", "5", "--model.size", "96", "--model.width_mult", "0.5"],
        *["--model.ema_decay", "0.9", "--trainer.max_epochs", "3"],
        *["--trainer.check_val_every_n_epoch", "1", "--data.val_split", "val2017"],
        *extra,
    ]


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mnv3det.cli", "fit", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the DDP ranks too are killed with the group
    )


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm (another file system)")
def test_fit_killed_while_last_ckpt_is_rewritten_resumes_exactly(tmp_path) -> None:
    root = generate_shapes_coco(
        tmp_path / "coco", num_train=9, num_val=3, image_size=(120, 96), seed=3
    )
    args = detection_args(root, tmp_path, "--trainer.devices", "1", "--data.num_workers", "0")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    run(args, straight)
    final = straight / "logs" / NAME / "version_0" / "checkpoints" / "last.ckpt"

    shm = Path("/dev/shm") / f"mnv3det-test-{os.getpid()}"
    shm.mkdir(exist_ok=True)
    folder = broken / "logs" / NAME / "version_0" / "checkpoints"
    proc = start(args, broken, {**ENV, "TMPDIR": str(shm)})
    caught = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and caught is None:
            # kill on the first sight of last.ckpt's temporary file after step 4 (it is being
            # rewritten)
            if folder.is_dir():
                temps = [p.name for p in os.scandir(folder) if p.name.startswith(LAST_TEMP)]
                last = folder / "last.ckpt"
                if temps and last.is_file() and global_step(last) >= 4:
                    kill_group(proc)
                    caught = temps
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            kill_group(proc)
        for leftover in shm.iterdir():
            leftover.unlink()
        shm.rmdir()
    assert caught, "no checkpoint write was caught in progress"
    last = find_last_checkpoint(broken / "logs" / NAME)
    killed_at = global_step(last)  # loads: not truncated
    assert killed_at < global_step(final)
    proc = run(args, broken, "--ckpt_path", "last")
    assert "continuing from" in proc.stdout + proc.stderr
    print(f"killed while writing {caught} (last.ckpt then at step {killed_at}); resumed:")
    assert_same_run(folder / "last.ckpt", final)
    assert not [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.slow
def test_two_process_ddp_fit_killed_mid_epoch_resumes_exactly(tmp_path) -> None:
    # 13 images over 2 processes at batch 2: 3 steps per epoch (each process drops its tail)
    root = generate_shapes_coco(
        tmp_path / "coco", num_train=13, num_val=3, image_size=(120, 96), seed=3
    )
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.num_workers", "1"]
    args = detection_args(root, tmp_path, *ddp)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    run(args, straight, timeout=420)
    final = straight / "logs" / NAME / "version_0" / "checkpoints" / "last.ckpt"
    assert global_step(final) == 9

    proc = start(args, broken, ENV)
    logs = broken / "logs" / NAME
    try:
        deadline, step = time.monotonic() + 300, -1
        while time.monotonic() < deadline and proc.poll() is None:
            last = find_last_checkpoint(logs)
            if last is not None:
                step = int(torch.load(last, weights_only=True)["global_step"])
                if step > 3 and step % 3:  # mid-epoch, after the first epoch
                    kill_group(proc)
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert 3 < step < 9 and step % 3, f"not killed mid-epoch (last.ckpt at step {step})"
    proc = run(args, broken, "--ckpt_path", "last", timeout=420)
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    print(f"2-process DDP run killed at step {step}, resumed:")
    assert_same_run(logs / "version_0" / "checkpoints" / "last.ckpt", final)
