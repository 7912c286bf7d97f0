"""User errors reach the terminal as one line naming the file and the fix, not a traceback;
``--traceback`` / ``MNV3DET_TRACEBACK=1`` bring the traceback back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/ssdlite320_mnv3_small_coco.yaml")
FAST = ["--trainer.accelerator", "cpu", "--data.num_workers", "0", "--data.pin_memory", "false"]


def mnv3det(*args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "mnv3det.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def error_lines(stderr: str) -> list[str]:
    """The lines from our error message on (Lightning prints its own banner lines before)."""
    lines = stderr.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("mnv3det "))
    return lines[start:]


def test_missing_data_root_is_one_line_naming_the_file(tmp_path) -> None:
    proc = mnv3det(
        "fit", "--config", CONFIG, "--data.root", str(tmp_path / "nope"), *FAST, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 2
    assert lines[0].startswith("mnv3det fit: error: ")
    assert str(tmp_path / "nope" / "annotations") in lines[0]
    assert "--traceback" in lines[1]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_traceback_on_request(tmp_path, how) -> None:
    args = ["fit", "--config", CONFIG, "--data.root", str(tmp_path / "nope"), *FAST]
    if how == "flag":
        proc = mnv3det(*args, "--traceback", cwd=tmp_path)
    else:
        proc = mnv3det(*args, env={"MNV3DET_TRACEBACK": "1"}, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr


def _checkpoints(folder: Path) -> dict[str, Path]:
    truncated = folder / "truncated.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1000)}, "hyper_parameters": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    text = folder / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    foreign = folder / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), foreign)
    return {
        "missing": folder / "missing.ckpt",
        "truncated": truncated,
        "text": text,
        "foreign": foreign,
    }


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        ("validate", "missing"),
        ("validate", "truncated"),
        ("validate", "text"),
        ("validate", "foreign"),
        ("fit", "truncated"),
        ("predict", "foreign"),
    ],
)
def test_bad_ckpt_path_is_one_line_naming_the_file(tmp_path, kind, command) -> None:
    path = _checkpoints(tmp_path)[kind]
    proc = mnv3det(
        command, "--config", CONFIG, "--data.root", str(tmp_path), "--ckpt_path", str(path),
        *FAST, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 2 and lines[0].startswith(f"mnv3det {command}: error: ")
    assert str(path) in lines[0]


# In-process checks of the parser's manners (no subprocess: quicker, same code path).
from mnv3det.cli import main as cli_main  # noqa: E402


def test_abbreviated_option_is_an_error_with_the_nearest_key(capsys) -> None:
    status = cli_main(["fit", "--config", CONFIG, "--trainer.max_epoch", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 2
    assert "--trainer.max_epoch" in err[0] and "did you mean --trainer.max_epochs?" in err[0]


def test_misspelt_config_key_names_the_class_and_the_nearest_argument(tmp_path, capsys) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    lrr: 0.1\n")
    status = cli_main(["fit", "--config", CONFIG, "--config", str(typo)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 2
    assert "DetectionTask" in err[0] and "'lrr'" in err[0] and "did you mean 'lr'?" in err[0]


def test_version(capsys) -> None:
    assert cli_main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mnv3det ") and "torch " in out and "lightning " in out


def test_help_lists_the_config_classes_options_and_short_class_names_work(capsys) -> None:
    assert cli_main(["fit", "--config", CONFIG, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--trainer.max_epochs" in out
    assert "--model.lr LR" in out and "default: 0.15" in out
    assert "--data.root ROOT" in out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--model.help", "DetectionTask"])
    assert exit_info.value.code == 0
    assert "--model.score_thresh" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["benchmark", "--help"], ["export", "--help"], ["demo", "detection", "--help"]]
)
def test_tool_help_shows_every_default_in_plain_text(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "(default: " in out and "``" not in out and ":mod:" not in out
    if argv[0] == "benchmark":
        assert "--batch-sizes BATCH_SIZES\n                        (default: 1,8)" in out
