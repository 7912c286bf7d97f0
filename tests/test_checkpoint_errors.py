"""Bad checkpoints raise one of our errors naming the file and what was expected.

Missing, empty, truncated, text, JPEG and foreign (a resnet18 state_dict) files, through every
Python entry point (``load_model``, ``ssdlite``, ``lraspp``, ``mobilenet_v3``) and through
``mnv3det export --checkpoint`` in a subprocess (exit status 2, one error line with the name).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import mnv3det
from mnv3det.models.from_checkpoint import load_model
from mnv3det.weights import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointReadError,
)

CASES = ("missing", "empty", "truncated", "text", "jpeg", "foreign")
EXPECTED = {
    "missing": (CheckpointNotFoundError, "not found"),
    "empty": (CheckpointReadError, "empty"),
    "truncated": (CheckpointReadError, "truncated"),
    "text": (CheckpointReadError, "not a PyTorch checkpoint"),
    "jpeg": (CheckpointReadError, "not a PyTorch checkpoint"),
    "foreign": ((CheckpointFormatError, CheckpointMismatchError), "checkpoint"),
}
ENTRY_POINTS: dict[str, Callable] = {
    "load_model": load_model,
    "ssdlite": lambda p: mnv3det.ssdlite(weights=p),
    "lraspp": lambda p: mnv3det.lraspp(weights=p),
    "mobilenet_v3": lambda p: mnv3det.mobilenet_v3(weights=p),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    files = {"missing": root / "missing.ckpt", "empty": root / "empty.ckpt"}
    files["empty"].write_bytes(b"")
    torch.manual_seed(0)
    real = {
        "state_dict": {f"model.{k}": v for k, v in mnv3det.lraspp("small").state_dict().items()}
    }
    torch.save(real, root / "real.ckpt")
    data = (root / "real.ckpt").read_bytes()
    files["truncated"] = root / "truncated.ckpt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"] = root / "notes.ckpt"
    files["text"].write_text("hello, these are not weights\n")
    files["jpeg"] = root / "photo.ckpt"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(files["jpeg"], format="JPEG")
    files["foreign"] = root / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), files["foreign"])
    return files


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_is_our_error_naming_the_file(bad_files, case, entry) -> None:
    error, words = EXPECTED[case]
    path = bad_files[case]
    with pytest.raises(error) as info:
        ENTRY_POINTS[entry](path)
    assert isinstance(info.value, (ValueError, FileNotFoundError))
    message = str(info.value)
    assert str(path) in message and words in message
    assert "PytorchStreamReader" not in message


def test_foreign_checkpoint_says_what_was_expected(bad_files) -> None:
    with pytest.raises(CheckpointFormatError, match="neither an SSDLite nor an LR-ASPP"):
        load_model(bad_files["foreign"])
    with pytest.raises(CheckpointFormatError, match="not an SSDLite checkpoint"):
        mnv3det.ssdlite(weights=bad_files["foreign"])
    with pytest.raises(CheckpointFormatError, match="not an LR-ASPP checkpoint"):
        mnv3det.lraspp(weights=bad_files["foreign"])


def test_wrong_builder_for_a_checkpoint(tmp_path) -> None:
    path = tmp_path / "seg.pt"
    torch.save(mnv3det.lraspp("small").state_dict(), path)
    with pytest.raises(CheckpointFormatError, match="holds a lraspp model, not ssdlite"):
        load_model(path, builder="ssdlite")


@pytest.mark.parametrize("case", CASES)
def test_export_cli_prints_the_file_name(bad_files, case, tmp_path) -> None:
    path = bad_files[case]
    proc = subprocess.run(
        [sys.executable, "-m", "mnv3det.cli", "export", "--model", "ssdlite",
         "--checkpoint", str(path), "--output", str(tmp_path / "x.onnx")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr
