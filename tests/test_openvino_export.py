"""``mnv3det export --format openvino``: OpenVINO IR of our ONNX files, run by OpenVINO on the
CPU in float32 and compared with the PyTorch models (as a user runs it: the CLI in a
subprocess, then the ``.xml`` through :class:`mnv3det.deploy.onnx.OnnxDetector`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import randomize_bn_stats
from test_inference import assert_same_detections, spread_head

import mnv3det
from mnv3det.deploy.onnx import OnnxDetector, OnnxSegmenter
from mnv3det.deploy.wrappers import SegmenterDeploy

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")


def _export(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mnv3det.cli", "export", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_ssdlite_openvino_ir_same_detections(tmp_path) -> None:
    torch.manual_seed(0)
    model = mnv3det.ssdlite("large", num_classes=5, size=128, width_mult=0.5)
    model = spread_head(randomize_bn_stats(model)).eval()
    weights = tmp_path / "ssdlite.pt"
    torch.save(model.state_dict(), weights)
    xml = tmp_path / "ir" / "ssdlite.xml"
    args = ["--model", "ssdlite", "--num-classes", "5", "--size", "128", "--width-mult", "0.5"]
    run = _export(
        *args, "--weights", str(weights), "--format", "openvino", "--output", str(xml), "--check"
    )
    assert run.returncode == 0, run.stderr
    assert (
        xml.is_file() and xml.with_suffix(".bin").is_file() and xml.with_suffix(".onnx").is_file()
    )
    assert "check: openvino detections per image" in run.stdout
    detector = OnnxDetector(xml, model.size, 5, threads=2, runtime="openvino")
    images = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images)
    for a, b in zip(expected, detector(images), strict=True):
        assert len(a["scores"]) > 0
        assert_same_detections(a, b, box_tol=1e-2, score_tol=1e-5)


def test_lraspp_openvino_ir_same_logits(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize_bn_stats(mnv3det.lraspp("large", num_classes=19, width_mult=0.5)).eval()
    weights = tmp_path / "lraspp.pt"
    torch.save(model.state_dict(), weights)
    xml = tmp_path / "lraspp.xml"
    run = _export("--model", "lraspp", "--width-mult", "0.5", "--weights", str(weights), "--format", "openvino",
                  "--output", str(xml))  # fmt: skip
    assert run.returncode == 0, run.stderr
    images = torch.rand(1, 3, 128, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = SegmenterDeploy(model)(images)
    got = OnnxSegmenter(xml, threads=2, runtime="openvino")(images)  # float32: exact enough
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-3
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_openvino_output_must_be_xml(tmp_path) -> None:
    run = _export("--model", "lraspp", "--width-mult", "0.5", "--format", "openvino",
                  "--output", str(tmp_path / "model.onnx"))  # fmt: skip
    assert run.returncode == 2
    assert ".xml" in run.stderr and "model.onnx" in run.stderr
