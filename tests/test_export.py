"""ONNX export: SSDLite with decoding + NMS in the graph and LR-ASPP with dynamic H/W, run in
onnxruntime on the CPU and compared with the PyTorch models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_bn_stats
from test_inference import assert_same_detections, spread_head

import mnv3det
from mnv3det.cli.export import main as export_main
from mnv3det.deploy.onnx import OnnxSegmenter
from mnv3det.deploy.wrappers import SegmenterDeploy, dense_to_list

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def ssdlite_export(tmp_path_factory):
    """A small SSDLite (random BN statistics) saved, then exported through the CLI."""
    tmp = tmp_path_factory.mktemp("ssdlite")
    torch.manual_seed(0)
    model = mnv3det.ssdlite("large", num_classes=5, size=128, width_mult=0.5)
    model = spread_head(randomize_bn_stats(model)).eval()
    weights = tmp / "ssdlite.pt"
    torch.save(model.state_dict(), weights)
    output = tmp / "ssdlite.onnx"
    args = ["--model", "ssdlite", "--num-classes", "5", "--size", "128", "--width-mult", "0.5"]
    rc = export_main([*args, "--weights", str(weights), "--output", str(output)])
    assert rc == 0 and output.is_file()
    return model, output


def export_small_lraspp(folder, name, *options):
    """A seeded LR-ASPP-Large x0.5 (random BN statistics) saved and exported with ``mnv3det
    export ... --check`` and ``options``: ``(model, onnx path)``."""
    torch.manual_seed(0)
    model = randomize_bn_stats(mnv3det.lraspp("large", num_classes=19, width_mult=0.5)).eval()
    weights = folder / "lraspp.pt"
    torch.save(model.state_dict(), weights)
    output = folder / name
    args = ["--model", "lraspp", "--width-mult", "0.5", "--weights", str(weights)]
    rc = export_main([*args, *options, "--output", str(output), "--check"])
    assert rc == 0 and output.is_file()
    return model, output


@pytest.fixture(scope="module")
def lraspp_export(tmp_path_factory):
    return export_small_lraspp(tmp_path_factory.mktemp("lraspp"), "lraspp.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3, 128, 128), (1, 3, 96, 160), (3, 3, 200, 150)])
def test_ssdlite_onnx_matches_pytorch(ssdlite_export, shape):
    model, path = ssdlite_export
    sess = session(path)
    assert [o.name for o in sess.get_outputs()] == ["boxes", "scores", "labels", "num_detections"]
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    boxes, scores, labels, num = sess.run(None, {"images": images.numpy()})
    assert boxes.shape == (shape[0], 300, 4) and labels.dtype == np.int64
    with torch.no_grad():
        ref = model(images)
    out = dense_to_list(boxes, scores, labels, num)
    for a, b in zip(ref, out, strict=True):
        assert len(a["scores"]) > 0
        # boxes in input-image pixels within 1e-2 px; scores to float rounding
        assert_same_detections(a, b, box_tol=1e-2, score_tol=1e-5)


@pytest.mark.slow
def test_ssdlite_onnx_graph_has_postprocessing(ssdlite_export):
    _, path = ssdlite_export
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"NonMaxSuppression", "TopK", "Softmax", "Exp"} <= ops
    assert "BatchNormalization" not in ops  # folded before export
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1)  # dynamic N, H, W


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 3, 64, 128), (2, 3, 100, 72)])
def test_lraspp_onnx_logits_match_with_dynamic_size(lraspp_export, shape):
    model, path = lraspp_export
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    (logits,) = session(path).run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref = SegmenterDeploy(model)(images).numpy()
    assert logits.shape == ref.shape == (shape[0], 19, *shape[2:])
    np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=0)


def test_lraspp_low_res_logits_give_the_label_map(tmp_path, capsys):
    """``--low-res-logits``: the graph stops before the final upsampling; OnnxSegmenter
    upsamples (same logits as the model) and its label map equals the model's predict_labels."""
    model, output = export_small_lraspp(tmp_path, "lraspp_low.onnx", "--low-res-logits")
    assert "max |logits difference|" in capsys.readouterr().out
    assert [o.name for o in session(output).get_outputs()] == ["low_logits"]
    segmenter = OnnxSegmenter(output, threads=2)
    images = torch.rand(2, 3, 160, 296, generator=torch.Generator().manual_seed(2))
    (low,) = session(output).run(None, {"images": images.numpy()})
    assert low.shape == (2, 19, 20, 37)
    with torch.no_grad():
        torch.testing.assert_close(segmenter(images), model(images), atol=1e-3, rtol=0)
        assert torch.equal(segmenter.predict_labels(images), model.predict_labels(images))
    with pytest.raises(SystemExit):  # SSDLite has no such output
        export_main(["--model", "ssdlite", "--low-res-logits", "--output", str(output)])


def test_export_cli_errors(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    rc = export_main(["--model", "lraspp", "--weights", str(missing), "--output", "x.onnx"])
    assert rc == 2 and "nope.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --int8 without calibration data
        export_main(["--model", "lraspp", "--output", str(tmp_path / "a.onnx"), "--int8"])
    assert "--calib-root" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_table_small(capsys):
    """The benchmark runs (tiny sizes, one iteration) and prints one markdown table: LR-ASPP
    in-process through the ONNX export path, SSDLite in a subprocess (its own peak memory)."""
    from mnv3det.cli.benchmark import main as benchmark_main

    common = ["--batch-sizes", "2", "--iters", "1", "--warmup", "0", "--no-load-check"]
    seg = ["--models", "lraspp", *common, "--seg-size", "64x96", "--in-process"]
    assert benchmark_main([*seg, "--configs", "torchvision,onnx_fp32"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| LR-ASPP")]
    assert [r.split("|")[2].strip() for r in rows] == ["torchvision eager", "ONNX fp32"]
    assert "1.00x" in rows[0] and rows[1].split("|")[8].strip() == "in graph"

    det = ["--models", "ssdlite", *common, "--det-size", "200x240", "--configs", "fused"]
    det += ["--score-regimes", "trained"]  # one row (the heavy regime is a second one)
    assert benchmark_main([*det, "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "pooled over 2 interleaved rounds" in out
    (row,) = [ln for ln in out.splitlines() if ln.startswith("| SSD")]
    cells = [c.strip() for c in row.split("|")]
    assert cells[2] == "ours fused" and cells[12] == "3.44M"  # torchvision's size
    assert float(cells[11]) > 50  # peak RSS (MB) of the worker process
    assert all(float(cells[i]) > 0 for i in (4, 6, 8, 9, 10))  # e2e, img/s, pre, net, post


def test_benchmark_merge_rounds_pools_timings():
    from mnv3det.deploy.benchmark.timing import merge_rounds, summarise

    base = {"model": "ssdlite", "config": "fused", "batch": 1}
    rounds = [
        {**base, **summarise([10.0, 11.0, 12.0]), "stages_ms": {"net": 8.0}, "peak_rss_mb": 700},
        {**base, **summarise([20.0, 21.0, 22.0]), "stages_ms": {"net": 9.0}, "peak_rss_mb": 750},
        {**base, **summarise([13.0, 14.0, 15.0]), "stages_ms": {"net": 30.0}, "peak_rss_mb": 720},
    ]
    row = merge_rounds(rounds)
    assert row["median_ms"] == 14.0 and row["p25_ms"] == 12.0 and row["p75_ms"] == 20.0
    assert row["stages_ms"] == {"net": 9.0} and row["peak_rss_mb"] == 750 and row["rounds"] == 3
    assert row["images_per_s"] == 1000 / 14.0


def test_benchmark_rejects_unknown_config():
    from mnv3det.cli.benchmark import main as benchmark_main

    with pytest.raises(SystemExit):
        benchmark_main(["--configs", "tensorrt"])
