"""ExecuTorch export (``mnv3det export --format executorch``): the ``.pte`` programs run in
ExecuTorch's Python runtime on the CPU and compared with the eager models (fp32: detections
equal, boxes within 1e-2 px; logits within 1e-3), int8 programs calibrated on image files, and the
README's post-processing pseudo-code (ported here line by line) equal to
:func:`mnv3det.deploy.executorch.select_detections`.

Skipped without the ``mobile`` extra (``pip install -e ".[mobile]"``); ``.ci/run`` installs it
and runs this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_bn_stats
from PIL import Image
from test_inference import assert_same_detections, small_ssdlite

import mnv3det
from mnv3det.cli.export import main as export_main
from mnv3det.deploy.wrappers import SegmenterDeploy

pytest.importorskip("executorch")
et = pytest.importorskip("mnv3det.deploy.executorch")

SSD_ARGS = ["--model", "ssdlite", "--num-classes", "5", "--size", "128", "--width-mult", "0.5"]
SEG_ARGS = ["--model", "lraspp", "--width-mult", "0.5"]


def _image_folder(folder: Path, count: int = 4) -> Path:
    """A few PNG files (random pixels) to calibrate on: ``calibration_images`` reads any folder."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(0)
    for i in range(count):
        pixels = gen.integers(0, 256, size=(96 + 8 * i, 120, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def ssdlite_pte(tmp_path_factory):
    """A small SSDLite (random BN statistics, spread head) saved, exported fp32 + int8 by the CLI."""
    tmp = tmp_path_factory.mktemp("ssdlite_pte")
    model = small_ssdlite()
    weights = tmp / "ssdlite.pt"
    torch.save(model.state_dict(), weights)
    output = tmp / "ssdlite.pte"
    calib = _image_folder(tmp / "calib")
    args = [*SSD_ARGS, "--weights", str(weights), "--output", str(output), "--batch", "2"]
    rc = export_main([*args, "--format", "executorch", "--int8", "--calib-root", str(calib)])
    assert rc == 0 and output.is_file()
    return model, output, tmp / "ssdlite.int8.pte"


@pytest.fixture(scope="module")
def lraspp_pte(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lraspp_pte")
    torch.manual_seed(0)
    model = randomize_bn_stats(mnv3det.lraspp("large", num_classes=19, width_mult=0.5)).eval()
    weights = tmp / "lraspp.pt"
    torch.save(model.state_dict(), weights)
    output = tmp / "lraspp.pte"
    calib = _image_folder(tmp / "calib")
    args = [*SEG_ARGS, "--weights", str(weights), "--output", str(output), "--check"]
    args += ["--format", "executorch", "--input-size", "64x128", "--int8", "--calib-root"]
    assert export_main([*args, str(calib)]) == 0 and output.is_file()
    return model, output, tmp / "lraspp.int8.pte"


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3, 128, 128), (3, 3, 200, 150)])
def test_ssdlite_pte_detections_equal_eager(ssdlite_pte, shape):
    """fp32: the program + select_detections give the eager model's detections (any image size:
    the wrapper resizes to the program's size, the one resize the eager model makes too)."""
    model, path, _ = ssdlite_pte
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ref = model(images)
    out = et.ExecuTorchDetector(path)(images)
    for a, b in zip(ref, out, strict=True):
        assert len(a["scores"]) > 0
        assert_same_detections(a, b, box_tol=1e-2, score_tol=1e-5)


@pytest.mark.slow
def test_ssdlite_pte_outputs_and_settings(ssdlite_pte):
    model, path, _ = ssdlite_pte
    settings = json.loads(Path(f"{path}.json").read_text())
    assert settings["model"] == "ssdlite" and settings["input_size"] == [128, 128]
    assert settings["outputs"] == ["boxes", "scores"] and settings["batch"] == 2
    assert settings["nms_thresh"] == model.nms_thresh
    assert settings["detections_per_img"] == model.detections_per_img
    method = et.load_method(path)
    boxes, scores = method.execute([torch.rand(2, 3, 128, 128)])
    k = settings["topk_candidates"]
    assert boxes.shape == (2, 4, k, 4) and scores.shape == (2, 4, k)  # 4 foreground classes
    assert bool((scores[..., :-1] >= scores[..., 1:]).all())  # each class row sorted


def readme_select(boxes, scores, nms_thresh, score_thresh, detections_per_img, box_scale):
    """The README's post-processing pseudo-code for one image, in plain Python (the port a
    mobile app makes): greedy NMS per class on the sorted candidates, then the best overall."""

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    detections = []
    for c in range(len(scores)):  # class row c is label c + 1
        kept = []
        for j in range(len(scores[c])):  # sorted by decreasing score
            if scores[c][j] <= score_thresh:
                break
            if all(iou(boxes[c][j], boxes[c][i]) <= nms_thresh for i in kept):
                kept.append(j)
        detections += [(scores[c][j], c + 1, boxes[c][j]) for j in kept]
    detections.sort(key=lambda d: -d[0])
    return [
        (s, label, [v * f for v, f in zip(box, box_scale)])
        for s, label, box in detections[:detections_per_img]
    ]


@pytest.mark.slow
def test_readme_pseudocode_equals_select_detections(ssdlite_pte):
    _, path, _ = ssdlite_pte
    s = et.read_settings(path)
    boxes, scores = et.load_method(path).execute([torch.rand(2, 3, 128, 128)])
    scale = [1.5, 2.0, 1.5, 2.0]
    out_boxes, out_scores, out_labels, num = et.select_detections(
        boxes, scores, s["nms_thresh"], s["score_thresh"], s["detections_per_img"], scale
    )
    for i in range(2):
        ref = readme_select(
            boxes[i].double().tolist(),
            scores[i].double().tolist(),
            s["nms_thresh"],
            s["score_thresh"],
            s["detections_per_img"],
            scale,
        )
        assert int(num[i]) == len(ref) > 0
        assert_same_detections(
            {
                "scores": torch.tensor([d[0] for d in ref]),
                "labels": torch.tensor([d[1] for d in ref]),
                "boxes": torch.tensor([d[2] for d in ref]),
            },
            {"scores": out_scores[i, : len(ref)], "labels": out_labels[i, : len(ref)]}
            | {"boxes": out_boxes[i, : len(ref)]},
            box_tol=1e-4,
            score_tol=1e-6,
        )


@pytest.mark.slow
def test_ssdlite_int8_pte_runs(ssdlite_pte):
    _, fp32, int8 = ssdlite_pte
    assert int8.is_file() and int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert et.read_settings(int8)["int8"] is True
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    out = et.ExecuTorchDetector(int8)(images)
    assert all(len(d["scores"]) > 0 and d["boxes"].shape[1] == 4 for d in out)


@pytest.mark.slow
def test_lraspp_pte_logits_equal_eager(lraspp_pte):
    model, path, _ = lraspp_pte
    images = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = SegmenterDeploy(model)(images)
    logits = et.ExecuTorchSegmenter(path)(images)
    assert logits.shape == ref.shape == (1, 19, 64, 128)
    torch.testing.assert_close(logits, ref, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_lraspp_int8_pte_close_to_fp32(lraspp_pte):
    model, fp32, int8 = lraspp_pte
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    images = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = SegmenterDeploy(model)(images)
    logits = et.ExecuTorchSegmenter(int8)(images)
    agree = (logits.argmax(1) == ref.argmax(1)).float().mean()
    assert agree > 0.8, float(agree)


def test_export_litert_says_why(tmp_path, capsys):
    rc = export_main([*SEG_ARGS, "--output", str(tmp_path / "x.tflite"), "--format", "litert"])
    assert rc == 2
    assert "LiteRT" in capsys.readouterr().err


def test_export_executorch_bad_input_size(tmp_path, capsys):
    args = [*SEG_ARGS, "--output", str(tmp_path / "x.pte"), "--format", "executorch"]
    assert export_main([*args, "--input-size", "64by128"]) == 2
    assert "--input-size" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_executorch_rows(capsys):
    """The benchmark's ExecuTorch rows run (LR-ASPP, tiny size, one iteration, in-process;
    fp32 only: the int8 export is the same function, tested above)."""
    from mnv3det.cli.benchmark import main as benchmark_main

    args = ["--models", "lraspp", "--batch-sizes", "2", "--iters", "1", "--warmup", "0"]
    args += ["--seg-size", "64x96", "--in-process", "--calib-images", "2", "--no-load-check"]
    assert benchmark_main([*args, "--configs", "torchvision,executorch_fp32"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| LR-ASPP")]
    labels = [r.split("|")[2].strip() for r in rows]
    assert labels == ["torchvision eager", "ExecuTorch fp32 (XNNPACK)"]
    assert all(float(r.split("|")[4]) > 0 for r in rows)
