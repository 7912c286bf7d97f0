"""Post-training static int8 quantisation of the exported ONNX graphs (deployment; paper §7).

Why onnxruntime's quantiser and not torchao's PT2E flow: the deployment artefact here is the ONNX
graph (:mod:`mnv3det.deploy.onnx`), and onnxruntime's int8 kernels use this CPU's AVX512-VNNI
instructions directly; PT2E (``torchao.quantization.pt2e`` with ``X86InductorQuantizer``) only
becomes fast after ``torch.compile`` lowers it through Inductor (a C++ toolchain and minutes of
compilation per shape), and its output stays a PyTorch program. torchao is also not a dependency
of this project. See ``docs/deployment.md`` for the measured speed and accuracy.

Recipe: ``onnxruntime.quantization.quantize_static`` in the QDQ format, per-channel int8 weights
(symmetric), uint8 activations calibrated on images from the data set
(:func:`calibration_images`) with the 99.99th percentile of each activation's histogram. The
post-processing (softmax, box decoding, top-k, NMS, the final upsampling of LR-ASPP) is left in
float: every node that does not feed a convolution is excluded from quantisation. Every
convolution is int8 by default, the prediction layers (the convolutions whose outputs are the
class logits / box offsets / segmentation logits) included; ``float_prediction_layers=True``
keeps those in float.

Measured on a weakly trained demo detector (SSDLite-MobileNetV3-Small, 160 px, AP50 10.9 fp32):
MinMax calibration 7.4 AP50, entropy 7.4, percentile 99.9 7.0, 99.999 9.1, 99.99 9.7, and 9.9
with the prediction layers in float. The accuracy study is ``mnv3det int8-accuracy``
(:mod:`mnv3det.cli.int8_accuracy`); see ``docs/deployment.md``.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "ImageCalibrationReader",
    "calibration_images",
    "network_nodes",
    "prediction_convs",
    "quantize_onnx",
]


class ImageCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over float images in ``[0, 1]``.

    Args:
        images: ``(3, H, W)`` or ``(N, 3, H, W)`` float arrays/tensors, fed one by one.
        input_name: the graph input (``"images"`` for mnv3det exports).
    """

    def __init__(self, images: Iterable, input_name: str = "images") -> None:
        self._images = iter(images)
        self.input_name = input_name
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._images, None)
        if image is None:
            return None
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 3:
            array = array[None]
        self.count += 1
        return {self.input_name: np.ascontiguousarray(array)}

    def rewind(self) -> None:  # the MinMax calibrator reads the data once
        raise NotImplementedError("ImageCalibrationReader is single-pass")


def network_nodes(model) -> set[str]:
    """Names of the nodes that feed a ``Conv`` (and the ``Conv`` nodes): the network body.

    The pre-processing (normalisation, resize) feeds the first convolution and is part of the
    body; everything else -- the post-processing after the last convolutions -- is what
    :func:`quantize_onnx` leaves in float.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    body: set[str] = set()
    stack = [node for node in model.graph.node if node.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name in body:
            continue
        body.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return body


def prediction_convs(model) -> list[str]:
    """Names of the ``Conv`` nodes that feed no other ``Conv``: the prediction layers."""
    producer = {out: node for node in model.graph.node for out in node.output}
    feeding: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        stack, seen = [producer[i] for i in node.input if i in producer], set()
        while stack:
            parent = stack.pop()
            if parent.name in seen:
                continue
            seen.add(parent.name)
            if parent.op_type == "Conv":
                feeding.add(parent.name)
            else:
                stack.extend(producer[i] for i in parent.input if i in producer)
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in feeding]


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    images: Iterable,
    per_channel: bool = True,
    preprocess: bool = True,
    calibration: str = "percentile",
    percentile: float = 99.99,
    float_prediction_layers: bool = False,
) -> Path:
    """Static int8 (QDQ) quantisation of an mnv3det ONNX export.

    Args:
        fp32_path: the float model (from :mod:`mnv3det.deploy.onnx`).
        int8_path: where to write the int8 model.
        images: calibration images, ``(3, H, W)`` float in ``[0, 1]`` (a few hundred).
        per_channel: per-output-channel weight scales (needed for depthwise convolutions,
            whose channels have very different ranges).
        preprocess: run onnxruntime's ``quant_pre_process`` (shape inference and graph
            optimisation) first, as its documentation recommends.
        calibration: ``"percentile"`` (default), ``"minmax"`` or ``"entropy"``.
        percentile: the percentile of the ``"percentile"`` calibration.
        float_prediction_layers: leave the prediction convolutions (the ``Conv`` nodes that
            feed no other ``Conv``) in float. Off by default: on the demo detector quantising
            them costs the same AP50 (-0.29 vs -0.37 with them in float) and the int8 graph
            is ~15 % faster; on a weakly trained detector float prediction layers lost less.

    Returns:
        ``int8_path``.

    Raises:
        ValueError: no calibration images were given.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = fp32_path
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            source = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
            except Exception:
                source = fp32_path
        model = onnx.load(str(source))
        body = network_nodes(model)
        exclude = [n.name for n in model.graph.node if n.name not in body]
        if float_prediction_layers:
            exclude += prediction_convs(model)
        methods = {
            "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
        }
        if calibration not in methods:
            raise ValueError(
                f"quantize_onnx: calibration must be one of {sorted(methods)}, got {calibration!r}"
            )
        extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
        reusable = isinstance(images, list | tuple)  # a generator is read once, lazily

        def run(method: str) -> ImageCalibrationReader:
            options = dict(extra)
            if method == "percentile":
                options["CalibPercentile"] = percentile
            reader = ImageCalibrationReader(images)
            quantize_static(
                str(source),
                str(int8_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                nodes_to_exclude=exclude,
                extra_options=options,
            )
            return reader

        try:
            reader = run(calibration)
        except ValueError as err:
            # onnxruntime's histogram calibrators fail on an activation that is constant over
            # the whole calibration set ("Too many bins for data range"), e.g. a dead channel
            # of an untrained model: fall back to MinMax, and say so.
            if calibration == "minmax" or "bins" not in str(err):
                raise
            if not reusable:
                raise ValueError(
                    f"quantize_onnx: {calibration} calibration failed ({err}); pass the images "
                    "as a list so they can be read again, or use calibration='minmax'"
                ) from err
            warnings.warn(
                f"quantize_onnx: {calibration} calibration failed ({err}); using minmax",
                stacklevel=2,
            )
            reader = run("minmax")
        if reader.count == 0:
            int8_path.unlink(missing_ok=True)
            raise ValueError("quantize_onnx: no calibration images were given")
    return int8_path


def calibration_images(
    kind: str,
    root: str | Path,
    count: int = 300,
    split: str | None = None,
    seed: int = 0,
) -> Iterator[np.ndarray]:
    """Up to ``count`` images in ``[0, 1]`` from a data set, through the data module's eval pipeline.

    Args:
        kind: ``"ssdlite"`` (COCO layout: ``root/train2017``, ``annotations/...``) or
            ``"lraspp"`` (Cityscapes layout: ``leftImg8bit/``, ``gtFine/``).
        root: data set root.
        count: images to yield (a random subset when the split is larger, seeded).
        split: split to read (default ``train2017`` / ``train``: calibrate on training data,
            evaluate on validation).
        seed: subset seed.

    Raises:
        FileNotFoundError: ``root`` does not exist (the data set readers name missing files).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"calibration root {root} does not exist")
    if kind == "ssdlite":
        from mnv3det.data.coco import CocoDetection
        from mnv3det.data.detection_transforms import eval_transforms

        dataset = CocoDetection(root, split=split or "train2017", transforms=eval_transforms())
    elif kind == "lraspp":
        from mnv3det.data.cityscapes import CityscapesSegmentation
        from mnv3det.data.segmentation_transforms import eval_transforms as seg_eval_transforms

        dataset = CityscapesSegmentation(root, split or "train", transforms=seg_eval_transforms())
    else:
        raise ValueError(f"calibration_images: kind must be 'ssdlite' or 'lraspp', got {kind!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset))[:count]
    for index in order.tolist():
        image = dataset[index][0]
        yield np.asarray(image, dtype=np.float32)
