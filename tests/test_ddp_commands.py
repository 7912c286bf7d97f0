"""Every command of both shipped configs under DDP: two CPU processes (gloo), callbacks and all.

Each test runs ``mnv3det fit`` with two processes on a data set whose sizes are not multiples of
the batch or of the process count, then ``validate``, ``test`` and ``predict`` of its best
checkpoint with one process and with two. What must hold: every command ends (a deadline kills
the whole process group and fails the test instead of hanging), the run has one folder, the
pictures and reports are written once by rank 0, and the metrics and predictions of two
processes equal those of one.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DEADLINE_S = 420

COMMON = [
    *["--trainer.accelerator", "cpu", "--trainer.benchmark", "false"],
    *["--trainer.num_sanity_val_steps", "2", "--data.num_workers", "0"],
    *["--data.pin_memory", "false", "--seed_everything", "7"],
]


def processes(n: int) -> list[str]:
    return ["--trainer.devices", str(n), "--trainer.strategy", "ddp" if n > 1 else "auto"]


def mnv3det(command: str, args: list[str], cwd: Path) -> str:
    """Run ``mnv3det <command>``; fail on a non-zero exit or when the deadline passes (the whole
    process group, DDP ranks included, is killed then)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnv3det.cli", command, *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mnv3det {command} hung for {DEADLINE_S} s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"mnv3det {command} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def newest_metrics(logs: Path) -> dict[str, float]:
    """The last row's values of the newest run folder's ``metrics.csv``."""
    folder = max(logs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    values: dict[str, float] = {}
    with open(folder / "metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def fit_with_two_processes(args: list[str], cwd: Path, logs: Path) -> Path:
    out = mnv3det("fit", [*args, *processes(2)], cwd)
    runs = sorted(p.name for p in logs.iterdir())
    assert runs == ["version_0"], runs  # one run folder, whatever the number of processes
    run = logs / "version_0"
    assert out.count("[plots] ") == 1, out[-3000:]  # written once, by rank 0
    assert out.count("[data] nothing was skipped") == 1, out[-3000:]
    assert (run / "plots" / "results.png").is_file()
    assert (run / "plots" / "val_predictions.png").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    return best


def every_command(
    config: str, args: list[str], cwd: Path, keys: list[str], predict_extra: list[str]
) -> tuple[Path, Path]:
    """``fit`` with two processes, then ``validate``, ``test`` and ``predict`` of its best
    checkpoint with one and with two: the metrics ``keys`` are equal. Returns the two
    prediction folders."""
    args = ["--config", str(REPO / "configs" / f"{config}.yaml"), *COMMON, *args]
    logs = cwd / "logs" / config
    best = fit_with_two_processes(args, cwd, logs)
    for command, stage in (("validate", "val"), ("test", "test")):
        found = []
        for n in (1, 2):
            mnv3det(command, [*args, *processes(n), "--ckpt_path", str(best)], cwd)
            found.append(newest_metrics(logs))
        one, two = found
        names = [f"{stage}/{k}" for k in keys]
        for key in names:
            assert one[key] == two[key], (key, one[key], two[key])
        print(f"{command}, 1 and 2 processes: " + ", ".join(f"{k} = {one[k]:.6f}" for k in names))
    folders = []
    for n in (1, 2):
        out_dir = cwd / f"predictions_{n}"
        writer = ["--trainer.callbacks.output_dir", str(out_dir)]
        mnv3det(
            "predict",
            [*args, *processes(n), "--ckpt_path", str(best), *predict_extra, *writer],
            cwd,
        )
        folders.append(out_dir)
    assert files_of(folders[0]) == files_of(folders[1])
    return folders[0], folders[1]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_detection_config_fit_validate_test_predict_with_two_processes(tmp_path) -> None:
    # 11 training images over 2 processes at batch 2; 7 validation images (odd)
    root = generate_shapes_coco(
        tmp_path / "coco", num_train=11, num_val=7, image_size=(120, 96), seed=3
    )
    args = [
        *["--data.root", str(root), "--data.label_map", "contiguous", "--data.batch_size", "2"],
        *["--model.num_classes", "5", "--model.size", "96", "--model.width_mult", "0.5"],
        *["--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1"],
    ]
    keys = ["map", "map_50", "map_75", "mar_100"]
    one, _ = every_command("ssdlite320_mnv3_small_coco", args, tmp_path, keys, [])
    assert (one / "detections.json").stat().st_size > 2


@pytest.mark.slow
def test_segmentation_config_fit_validate_test_predict_with_two_processes(tmp_path) -> None:
    root = generate_street_scenes(
        tmp_path / "cityscapes", cities=("aachen", "bremen"), per_city=4, size=(64, 128)
    )
    # 7 validation images: one process gets one more than the other
    for kind, suffix in (("leftImg8bit", "leftImg8bit.png"), ("gtFine", "gtFine_*")):
        for path in (root / kind / "val" / "bremen").glob(f"bremen_000003_000019_{suffix}"):
            path.unlink()
    args = [
        *["--data.root", str(root), "--data.crop_size", "[64, 128]", "--data.batch_size", "2"],
        *["--data.val_batch_size", "2", "--data.test_split", "val", "--model.width_mult", "0.5"],
        *["--trainer.max_steps", "6", "--trainer.val_check_interval", "3"],
    ]
    keys = ["miou", "miou_all", "pixel_acc", "mean_acc"]
    predict_dir = ["--data.predict_dir", str(root / "leftImg8bit" / "val")]
    one, _ = every_command("lraspp_mnv3_small_cityscapes", args, tmp_path, keys, predict_dir)
    assert len(list((one / "color").rglob("*.png"))) == 7
