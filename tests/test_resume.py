"""Kill -9 a real ``mnv3det fit`` mid-epoch, resume it with ``--ckpt_path last``, and compare
with an uninterrupted run: same final global step, bit-identical weights (CPU, fixed seed).

Both tasks run the shipped configs shrunk from the command line, with augmentation on, two
DataLoader workers, ``last.ckpt`` every step (so the kill lands after a mid-epoch save) and, for
detection, an EMA of the weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from resume_runs import (
    assert_same_run,
    config_saving_every_step,
    global_step,
    metric_steps,
    run,
    run_and_kill,
)

from mnv3det.cli.runs import find_last_checkpoint
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco

COMMON = [
    *["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.benchmark", "false"],
    *["--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1"],
    *["--data.num_workers", "2", "--data.pin_memory", "false", "--seed_everything", "7"],
]


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


def kill_resume_compare(args: list[str], tmp_path: Path, name: str, steps_per_epoch: int) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir()
    broken.mkdir()
    run(args, straight)
    logs = broken / "logs" / name
    # as soon as last.ckpt holds a step in the middle of an epoch after the first one
    killed_at = run_and_kill(
        args,
        broken,
        logs,
        lambda step, _: step is not None and step > steps_per_epoch and step % steps_per_epoch,
    )
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
