"""Static int8 quantisation (onnxruntime QDQ) of the exported graphs: calibrated on generated
data-module images, network body in int8, post-processing left in float, outputs close to fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_bn_stats
from test_inference import spread_head

import mnv3det
from mnv3det.cli.export import main as export_main
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.deploy.int8 import calibration_images, network_nodes, quantize_onnx
from mnv3det.deploy.onnx import export_lraspp

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def run(path, images: np.ndarray):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": images})


def producers(graph) -> dict[str, str]:
    return {out: node.op_type for node in graph.node for out in node.output}


@pytest.mark.slow
def test_lraspp_int8_close_to_fp32(tmp_path):
    root = generate_street_scenes(tmp_path / "city", per_city=2, size=(64, 128))
    torch.manual_seed(0)
    model = randomize_bn_stats(mnv3det.lraspp("large", num_classes=19, width_mult=0.5)).eval()
    fp32 = export_lraspp(model, tmp_path / "seg.onnx", example_size=(64, 128))
    images = list(calibration_images("lraspp", root, count=6))
    assert len(images) == 6 and images[0].shape == (3, 64, 128)
    assert min(float(i.min()) for i in images) >= 0.0 and max(float(i.max()) for i in images) <= 1
    int8 = quantize_onnx(fp32, tmp_path / "seg.int8.onnx", images)

    graph = onnx.load(str(int8)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 20
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= ops.count("Conv")  # every conv weight stored as int8
    # post-processing in float: the final upsampling reads a float tensor, not a DQ output
    # straight from a quantised conv (no QuantizeLinear right before it)
    made_by = producers(graph)
    last_resize = [n for n in graph.node if n.op_type == "Resize"][-1]
    assert made_by[last_resize.input[0]] != "DequantizeLinear"

    x = np.stack(images[:2])
    (ref,) = run(fp32, x)
    (out,) = run(int8, x)
    assert out.shape == ref.shape
    assert np.abs(out - ref).mean() < 0.05 * np.abs(ref).mean() + 1e-3
    assert (out.argmax(1) == ref.argmax(1)).mean() > 0.9


@pytest.mark.slow
def test_ssdlite_int8_via_cli_keeps_postprocessing_float(tmp_path):
    coco = generate_shapes_coco(tmp_path / "coco", num_train=6, num_val=2, image_size=96)
    torch.manual_seed(0)
    model = mnv3det.ssdlite("large", num_classes=4, size=128, width_mult=0.5)
    model = spread_head(randomize_bn_stats(model)).eval()
    weights = tmp_path / "det.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "det.onnx"
    model_args = ["--model", "ssdlite", "--num-classes", "4", "--size", "128"]
    io_args = ["--width-mult", "0.5", "--weights", str(weights), "--output", str(out)]
    int8_args = ["--score-thresh", "0.2", "--int8", "--calib-root", str(coco)]
    rc = export_main([*model_args, *io_args, *int8_args, "--calib-images", "4"])
    int8 = tmp_path / "det.int8.onnx"
    assert rc == 0 and out.is_file() and int8.is_file()

    int8_model = onnx.load(str(int8))
    graph = int8_model.graph
    made_by = producers(graph)
    body = network_nodes(int8_model)
    for node in graph.node:
        if node.op_type in ("NonMaxSuppression", "TopK", "Softmax", "Exp"):
            assert node.name not in body
            assert all(made_by.get(i) != "DequantizeLinear" for i in node.input if i)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 20
    assert float_weight_convs(graph) == []  # every convolution is int8 by default

    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(3)).numpy()
    boxes32, scores32, _, _ = run(out, images)
    boxes8, scores8, _, num8 = run(int8, images)
    assert boxes8.shape == boxes32.shape and num8.shape == (2,)
    assert (num8 > 0).all() and (scores8[:, : int(num8.min())] > 0.2).all()
    # the best detection of each image survives quantisation with a close score
    assert np.abs(scores8[:, 0] - scores32[:, 0]).max() < 0.05

    # --float-prediction-layers keeps the 6 levels x (class, box) prediction convs in float
    mixed = tmp_path / "det.mixed.int8.onnx"
    more = ["--calib-images", "4", "--float-prediction-layers", "--int8-output", str(mixed)]
    assert export_main([*model_args, *io_args, *int8_args, *more]) == 0
    assert len(float_weight_convs(onnx.load(str(mixed)).graph)) == 12


def float_weight_convs(graph) -> list[str]:
    """Conv nodes whose weight is not dequantised int8 (i.e. float weights)."""
    made_by = producers(graph)
    return [
        n.name
        for n in graph.node
        if n.op_type == "Conv" and made_by.get(n.input[1]) != "DequantizeLinear"
    ]


def test_quantize_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(calibration_images("lraspp", tmp_path / "missing"))
    with pytest.raises(ValueError, match="kind"):
        next(calibration_images("yolo", tmp_path))


@pytest.mark.slow
def test_int8_accuracy_runs_the_tasks_validation(tmp_path):
    """``mnv3det int8-accuracy``: PyTorch, ONNX fp32 and int8 evaluated by DetectionTask's own
    validation (Trainer.validate); the fp32 export scores exactly what PyTorch scores."""
    from mnv3det.cli.int8_accuracy import int8_accuracy
    from mnv3det.models.from_checkpoint import save_model

    coco = generate_shapes_coco(tmp_path / "coco", num_train=4, num_val=3, image_size=96)
    torch.manual_seed(0)
    model = mnv3det.ssdlite("small", num_classes=5, size=96, width_mult=0.5, score_thresh=0.2)
    save_model(spread_head(randomize_bn_stats(model)).eval(), tmp_path / "det.pt")
    results = int8_accuracy(
        "ssdlite", coco, tmp_path / "work", weights=tmp_path / "det.pt", calib=4, log=print
    )
    assert set(results) == {"pytorch", "onnx_fp32", "onnx_int8"}
    assert results["onnx_fp32"] == pytest.approx(results["pytorch"], abs=1e-6)
    assert set(results["pytorch"]) == set(results["onnx_fp32"]) == {"AP", "AP50"}
    assert set(results["onnx_int8"]) == {"AP", "AP50", "calib_s", "calib_peak_rss_mb"}
    assert results["onnx_int8"]["calib_peak_rss_mb"] > 0
