"""Post-training static int8 quantisation of the exported ONNX graphs (deployment; paper §7).

Why onnxruntime's quantiser and not torchao's PT2E flow: the deployment artefact here is the ONNX
graph (:mod:`mnv3det.deploy.onnx`), and onnxruntime's int8 kernels use this CPU's AVX512-VNNI
instructions directly; PT2E (``torchao.quantization.pt2e`` with ``X86InductorQuantizer``) only
becomes fast after ``torch.compile`` lowers it through Inductor (a C++ toolchain and minutes of
compilation per shape), and its output stays a PyTorch program. torchao is also not a dependency
of this project. See ``docs/deployment.md`` for the measured speed and accuracy.

Recipe: ``onnxruntime.quantization.quantize_static`` in the QDQ format, per-channel int8 weights
(symmetric), uint8 activations. The post-processing (softmax, box decoding, top-k, NMS, the final
upsampling of LR-ASPP) is left in float: every node that does not feed a convolution is excluded
from quantisation. Every convolution is int8 by default, the prediction layers (the convolutions
whose outputs are the class logits / box offsets / segmentation logits) included;
``float_prediction_layers=True`` keeps those in float.

Calibration is streamed (:func:`collect_activation_stats`): one image at a time goes through the
network body with every activation to calibrate as an output, and each activation is folded at
once into a running minimum / maximum and a fixed-size histogram (:class:`ActivationStats`),
then dropped. Memory does not grow with the number of images, and images of any size and
orientation can be mixed (onnxruntime's own calibrators keep every activation of every image
and stack them, which fails on mixed sizes and took ~60 MB per image). The histogram's range is a
power of two that doubles (merging bin pairs, exactly) when an image exceeds it, so constant or
near-constant activations of an untrained model need no special case. The activation ranges
(``"minmax"``, ``"percentile"`` of ``|x|``, ``"entropy"``: TensorRT's KL-divergence search) are
handed to ``quantize_static`` as a calibration cache, so onnxruntime does not calibrate again.

The default (percentile 99.99, per-channel weights, every convolution int8) was chosen by the
accuracy table in ``docs/deployment.md`` (``mnv3det int8-accuracy --calibration ...``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_METHODS",
    "ActivationStats",
    "ImageCalibrationReader",
    "calibration_files",
    "calibration_images",
    "collect_activation_stats",
    "measure_quantization",
    "network_nodes",
    "prediction_convs",
    "quantize_onnx",
]

#: The calibration methods of :func:`quantize_onnx` (``ActivationStats.ranges``).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


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
        """The next image as ``{input_name: (N, 3, H, W) float32}``, or ``None`` at the end."""
        image = next(self._images, None)
        if image is None:
            return None
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 3:
            array = array[None]
        self.count += 1
        return {self.input_name: np.ascontiguousarray(array)}

    def rewind(self) -> None:
        """Not supported: the images are read once (a generator streams them)."""
        raise NotImplementedError("ImageCalibrationReader is single-pass")


class ActivationStats:
    """Running statistics of named activations, merged one array at a time in bounded memory.

    Per tensor: the minimum, the maximum and (with ``histogram=True``) a histogram of ``bins``
    equal bins on ``[-T, T]``, ``T`` the smallest power of two (at least ``2**-60``) covering
    every ``|x|`` seen so far. When a new array exceeds ``T``, ``T`` doubles and adjacent bin
    pairs merge, exactly, so the histogram of many arrays is the histogram of their union at the
    final ``T``; arrays of different shapes merge the same way.

    Args:
        bins: histogram bins (even; a power of two keeps the merging exact).
        histogram: keep histograms (needed by ``"percentile"`` and ``"entropy"``; ``"minmax"``
            needs only the extremes).
    """

    def __init__(self, bins: int = 4096, histogram: bool = True) -> None:
        if bins < 256 or bins & (bins - 1):
            raise ValueError(f"ActivationStats: bins must be a power of two >= 256, got {bins}")
        self.bins = bins
        self.histogram = histogram
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.limit: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}
        self.updates = 0

    def update(self, name: str, array: np.ndarray) -> None:
        """Fold one activation (any shape) into the statistics of ``name``.

        NaNs are ignored; an array that is empty or all NaN changes nothing.
        """
        x = np.asarray(array, dtype=np.float32).reshape(-1)
        if x.size == 0:
            return
        low, high = float(x.min()), float(x.max())
        if math.isnan(low) or math.isnan(high):
            x = x[~np.isnan(x)]
            if x.size == 0:
                return
            low, high = float(x.min()), float(x.max())
        self.updates += 1
        self.low[name] = min(low, self.low.get(name, low))
        self.high[name] = max(high, self.high.get(name, high))
        if not self.histogram:
            return
        amax = max(-low, high, 2.0**-60)
        limit = max(self.limit.get(name, 0.0), 2.0 ** math.ceil(math.log2(amax)))
        hist = self.hist.get(name)
        if hist is None:
            hist = np.zeros(self.bins, dtype=np.int64)
        else:
            hist = self._widen(hist, round(math.log2(limit / self.limit[name])))
        counts, _ = np.histogram(x, bins=self.bins, range=(-limit, limit))
        self.hist[name] = hist + counts
        self.limit[name] = limit

    def _widen(self, hist: np.ndarray, doublings: int) -> np.ndarray:
        """``hist`` on ``[-2**k T, 2**k T]``: ``k`` times, merge bin pairs into the middle half."""
        quarter = self.bins // 4
        for _ in range(min(doublings, int(math.log2(self.bins)) + 1)):
            merged = hist.reshape(-1, 2).sum(axis=1)
            hist = np.concatenate(
                [np.zeros(quarter, np.int64), merged, np.zeros(quarter, np.int64)]
            )
        return hist

    def names(self) -> list[str]:
        """The tensors seen so far."""
        return list(self.low)

    def ranges(
        self, method: str = "percentile", percentile: float = 99.99, quantized_bins: int = 128
    ) -> dict[str, tuple[float, float]]:
        """The calibrated ``(lowest, highest)`` range of every tensor.

        Args:
            method: ``"minmax"`` (the extremes), ``"percentile"`` (``[-t, t]`` with ``t`` the
                ``percentile``-th percentile of ``|x|``, cut to the extremes; onnxruntime's
                symmetric percentile calibration) or ``"entropy"`` (the symmetric range whose
                ``quantized_bins``-level quantisation has the least KL divergence from the
                histogram, TensorRT's method as in onnxruntime, cut to the extremes).
            percentile: of ``"percentile"``, in ``(0, 100]``.
            quantized_bins: of ``"entropy"``.

        Raises:
            ValueError: unknown method, or a histogram method without histograms.
        """
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {CALIBRATION_METHODS}, got {method!r}")
        if method == "minmax":
            return {n: (self.low[n], self.high[n]) for n in self.low}
        if not self.histogram:
            raise ValueError(f"{method} calibration needs ActivationStats(histogram=True)")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        result = {}
        for name, hist in self.hist.items():
            if method == "percentile":
                t = _percentile_threshold(hist, self.limit[name], percentile)
            else:
                t = _entropy_threshold(hist, self.limit[name], quantized_bins)
            result[name] = (max(-t, self.low[name]), min(t, self.high[name]))
        return result


def _percentile_threshold(hist: np.ndarray, limit: float, percentile: float) -> float:
    """The upper edge of the ``|x|`` bin where the cumulative share reaches ``percentile``."""
    half = hist.size // 2
    folded = hist[half:] + hist[half - 1 :: -1]  # bin j: |x| in [j, j + 1) * limit / half
    cdf = np.cumsum(folded) / max(int(folded.sum()), 1)
    index = min(int(np.searchsorted(cdf, percentile / 100.0)), half - 1)
    return (index + 1) * limit / half


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Zero bins get ``eps``, taken evenly from the others (onnxruntime's smooth_distribution)."""
    zeros = p == 0
    nonzeros = p.size - int(zeros.sum())
    if nonzeros == 0:
        return None
    out = p + np.where(zeros, eps, -eps * (p.size - nonzeros) / nonzeros)
    return np.maximum(out, eps * 1e-3)


def _entropy_threshold(
    hist: np.ndarray, limit: float, quantized_bins: int = 128, bins: int = 1024
) -> float:
    """TensorRT's KL-divergence threshold, on ``hist`` (over ``[-limit, limit]``) cut to ``bins``."""
    hist = hist.reshape(bins, -1).sum(axis=1).astype(np.float64)
    zero, half_q = bins // 2, quantized_bins // 2
    best, best_i = math.inf, zero
    for i in range(half_q, zero + 1):
        sliced = hist[zero - i : zero + i]
        p = sliced.copy()
        p[0] += hist[: zero - i].sum()
        p[-1] += hist[zero + i :].sum()
        n = p.size
        merged = n // quantized_bins
        starts = np.arange(quantized_bins) * merged
        nonzero = p != 0
        sums = np.add.reduceat(sliced, starts)
        counts = np.add.reduceat(nonzero.astype(np.float64), starts)
        group = np.minimum(np.arange(n) // merged, quantized_bins - 1)
        q = np.where(nonzero, (sums / np.maximum(counts, 1))[group], 0.0)
        ps, qs = _smooth(p), _smooth(q)
        if ps is None or qs is None:
            continue
        ps, qs = ps / ps.sum(), qs / qs.sum()
        divergence = float(np.sum(ps * np.log(ps / qs)))
        if divergence < best:
            best, best_i = divergence, i
    return best_i * limit / zero


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


def _body_tensors(model) -> list[str]:
    """Float activations read or written by the network body (what the quantiser needs)."""
    import onnx

    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]
        if vi.type.HasField("tensor_type")
    }
    constants = {t.name for t in model.graph.initializer}
    constants |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    body = network_nodes(model)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    names: dict[str, None] = {}
    for node in model.graph.node:
        if node.name in body:
            for name in [*node.input, *node.output]:
                if name and name not in constants and types.get(name) in floats:
                    names[name] = None
    return list(names)


def _calibration_graph(model, tensors: Sequence[str]):
    """``model`` with ``tensors`` as its only outputs and the nodes they need (a copy)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(model) if not model.graph.value_info else model
    infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output]}
    inputs = {vi.name for vi in model.graph.input}
    producer = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    needed: set[int] = set()
    stack = [producer[t] for t in tensors if t in producer]
    while stack:
        index = stack.pop()
        if index in needed:
            continue
        needed.add(index)
        stack.extend(producer[i] for i in model.graph.node[index].input if i in producer)
    graph = onnx.helper.make_graph(
        [node for i, node in enumerate(model.graph.node) if i in needed],
        model.graph.name,
        list(model.graph.input),
        [infos[t] if t in infos else _float_info(t) for t in tensors if t not in inputs]
        + [vi for vi in model.graph.input if vi.name in tensors],
        list(model.graph.initializer),
    )
    out = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out


def _float_info(name: str):
    import onnx

    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


def collect_activation_stats(
    model_path: str | Path,
    images: Iterable,
    tensors: Sequence[str] | None = None,
    histogram: bool = True,
    bins: int = 4096,
    threads: int | None = None,
) -> ActivationStats:
    """Stream images through a graph and fold its activations into :class:`ActivationStats`.

    One image at a time: the graph (cut to what the calibrated tensors need, with those tensors
    as outputs) runs in onnxruntime without its memory arena, every output is merged into the
    statistics and dropped. Peak memory is one image's activations, whatever the number of
    images; images may have different sizes.

    Args:
        model_path: the ONNX model (the one that will be quantised, e.g. after
            ``quant_pre_process``: the tensor names must match).
        images: ``(3, H, W)`` or ``(N, 3, H, W)`` float images in ``[0, 1]``, read lazily.
        tensors: tensors to calibrate (default: the float activations of the network body,
            :func:`network_nodes`).
        histogram: keep histograms (``"percentile"`` / ``"entropy"``); ``False`` for ``"minmax"``.
        bins: histogram bins.
        threads: onnxruntime intra-op threads (default: onnxruntime's).

    Returns:
        The statistics; ``stats.updates`` counts merged arrays (0: no image).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    names = list(tensors) if tensors is not None else _body_tensors(model)
    stats = ActivationStats(bins=bins, histogram=histogram)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep names
    options.enable_cpu_mem_arena = False  # no arena grown to the largest image and kept
    if threads is not None:
        options.intra_op_num_threads = threads
    graph = _calibration_graph(model, names).SerializeToString()
    del model
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    reader = ImageCalibrationReader(images, session.get_inputs()[0].name)
    while (feed := reader.get_next()) is not None:
        for name, value in zip(outputs, session.run(outputs, feed), strict=True):
            stats.update(name, value)
        del feed
    return stats


def _prepared_model(fp32_path: Path, tmp: Path, preprocess: bool) -> Path:
    """``fp32_path`` after onnxruntime's ``quant_pre_process`` (when it succeeds)."""
    if not preprocess:
        return fp32_path
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = tmp / "pre.onnx"
    try:
        quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
    except Exception as err:  # an optional optimisation: quantise the export as it is
        warnings.warn(f"quant_pre_process failed ({err}); quantising without it", stacklevel=3)
        return fp32_path
    return source


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    images: Iterable,
    per_channel: bool = True,
    preprocess: bool = True,
    calibration: str = "percentile",
    percentile: float = 99.99,
    float_prediction_layers: bool = False,
    threads: int | None = None,
) -> Path:
    """Static int8 (QDQ) quantisation of an mnv3det ONNX export, calibrated in bounded memory.

    Args:
        fp32_path: the float model (from :mod:`mnv3det.deploy.onnx`).
        int8_path: where to write the int8 model.
        images: calibration images, ``(3, H, W)`` float in ``[0, 1]`` of any sizes (a few
            hundred; a generator such as :func:`calibration_images` is read once, lazily).
        per_channel: per-output-channel weight scales (needed for depthwise convolutions,
            whose channels have very different ranges).
        preprocess: run onnxruntime's ``quant_pre_process`` (shape inference and graph
            optimisation) first, as its documentation recommends.
        calibration: ``"percentile"`` (default), ``"minmax"`` or ``"entropy"``
            (:meth:`ActivationStats.ranges`).
        percentile: the percentile of the ``"percentile"`` calibration.
        float_prediction_layers: leave the prediction convolutions (the ``Conv`` nodes that
            feed no other ``Conv``) in float. Off by default: on the demo detector quantising
            them costs about the same AP50 and the int8 graph is ~15 % faster.
        threads: onnxruntime intra-op threads of the calibration runs.

    Returns:
        ``int8_path``.

    Raises:
        ValueError: unknown calibration method, or no calibration images were given.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    if calibration not in CALIBRATION_METHODS:
        raise ValueError(
            f"quantize_onnx: calibration must be one of {CALIBRATION_METHODS}, got {calibration!r}"
        )
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise RuntimeError(
            "quantize_onnx needs onnxruntime's quantize_static(calibration_cache_path)"
        )
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = _prepared_model(fp32_path, Path(tmp), preprocess)
        model = onnx.load(str(source))
        body = network_nodes(model)
        exclude = [n.name for n in model.graph.node if n.name not in body]
        if float_prediction_layers:
            exclude += prediction_convs(model)
        tensors = _body_tensors(model)
        del model
        stats = collect_activation_stats(
            source, images, tensors, histogram=calibration != "minmax", threads=threads
        )
        if stats.updates == 0:
            raise ValueError("quantize_onnx: no calibration images were given")
        ranges = stats.ranges(calibration, percentile)
        method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[calibration]
        data = {
            name: TensorData(lowest=np.float32(low), highest=np.float32(high))
            for name, (low, high) in ranges.items()
        }
        cache = Path(tmp) / "calibration.json"
        save_tensors_data(TensorsData(method, data), cache)
        quantize_static(
            str(source),
            str(int8_path),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=exclude,
            calibration_cache_path=str(cache),
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    return int8_path


#: Image files :func:`calibration_files` lists (the data sets' list).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def calibration_files(
    kind: str, root: str | Path, count: int = 300, split: str | None = None, seed: int = 0
) -> list[Path]:
    """Up to ``count`` image files under a data set root or any image folder (seeded subset).

    Args:
        kind: ``"ssdlite"`` (COCO layout: images in ``root/<split>``, default ``train2017``) or
            ``"lraspp"`` (Cityscapes layout: ``root/leftImg8bit/<split>``, default ``train``).
            Without that folder (and no ``split`` given) every image under ``root`` is used,
            recursively: any folder of images calibrates; no annotations are read.
        root: data set root or image folder.
        count: files to return (a random subset when there are more, seeded).
        split: split folder (calibrate on training data, evaluate on validation).
        seed: subset seed.

    Raises:
        FileNotFoundError: ``root`` (or the ``split`` folder) does not exist, or holds no images.
        ValueError: unknown ``kind``.
    """
    root = Path(root)
    if kind not in ("ssdlite", "lraspp"):
        raise ValueError(f"calibration_images: kind must be 'ssdlite' or 'lraspp', got {kind!r}")
    if not root.exists():
        raise FileNotFoundError(f"calibration root {root} does not exist")
    if kind == "ssdlite":
        layout = root / (split or "train2017")
    else:
        layout = root / "leftImg8bit" / (split or "train")
    if split is not None and not layout.is_dir():
        raise FileNotFoundError(f"calibration split folder {layout} does not exist")
    folder = layout if layout.is_dir() else root
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    order = np.random.default_rng(seed).permutation(len(files))[:count]
    return [files[i] for i in sorted(order.tolist())]


def calibration_images(
    kind: str,
    root: str | Path,
    count: int = 300,
    split: str | None = None,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> Iterator[np.ndarray]:
    """Up to ``count`` calibration images, ``(3, H, W)`` float32 in ``[0, 1]``, read lazily.

    The files are :func:`calibration_files`; each is read by the data sets' reader
    (:func:`mnv3det.data.image_io.read_rgb`: upright after the EXIF orientation, grayscale and
    palette files as RGB), one at a time. An unreadable file is skipped with a warning.

    Args:
        kind: ``"ssdlite"`` or ``"lraspp"`` (which layout to look for, see
            :func:`calibration_files`).
        root: data set root or image folder.
        count: images to yield.
        split: split folder (default ``train2017`` / ``train``).
        seed: subset seed.
        size: ``(height, width)`` to resize every image to (bilinear), for a consumer that
            needs one input shape; ``None`` keeps each image's size (the ONNX graphs take any).

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no images.
        ValueError: unknown ``kind``.
    """
    from mnv3det.data.image_io import ImageReadError, read_rgb

    files = calibration_files(kind, root, count, split=split, seed=seed)
    for path in files:
        try:
            image = read_rgb(path)
        except (ImageReadError, FileNotFoundError) as err:
            warnings.warn(f"calibration: skipping {path}: {err}", stacklevel=2)
            continue
        if size is not None and image.shape[:2] != tuple(size):
            import cv2

            image = cv2.resize(image, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
        yield np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 255.0


def measure_quantization(
    fp32_path: str | Path,
    int8_path: str | Path,
    kind: str,
    root: str | Path,
    count: int = 300,
    split: str | None = None,
    size: tuple[int, int] | None = None,
    timeout: float | None = None,
    **options: Any,
) -> dict[str, float]:
    """:func:`quantize_onnx` on :func:`calibration_images` in a fresh Python subprocess.

    Args:
        fp32_path: float model.
        int8_path: int8 output.
        kind: ``"ssdlite"`` / ``"lraspp"`` (:func:`calibration_files`).
        root: data set root or image folder.
        count: calibration images.
        split: split folder.
        size: resize of :func:`calibration_images`.
        timeout: seconds before the subprocess is killed.
        **options: :func:`quantize_onnx` keywords (``calibration``, ``percentile``, ...).

    Returns:
        ``{"seconds": calibration + quantisation time, "peak_rss_mb": the subprocess's peak
        resident memory, "baseline_rss_mb": its peak after the imports, before calibrating}``.

    Raises:
        RuntimeError: the subprocess failed (its stderr is in the message).
    """
    request = {
        "fp32": str(fp32_path),
        "int8": str(int8_path),
        "kind": kind,
        "root": str(root),
        "count": count,
        "split": split,
        "size": list(size) if size is not None else None,
        "options": options,
    }
    code = "from mnv3det.deploy.int8 import _measure_child; _measure_child()"
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"quantisation subprocess failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    ``VmHWM`` of ``/proc/self/status`` where there is one: ``getrusage``'s ``ru_maxrss`` of a
    subprocess also counts its parent's memory at the fork before ``exec`` (Linux keeps the
    larger), so a large parent would hide the child's own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _measure_child() -> None:
    """Subprocess side of :func:`measure_quantization` (request on stdin, JSON on stdout)."""
    import onnxruntime  # noqa: F401  (counted in the baseline)

    request = json.loads(sys.stdin.read())
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    images = calibration_images(
        request["kind"],
        request["root"],
        request["count"],
        split=request["split"],
        size=tuple(request["size"]) if request["size"] else None,
    )
    quantize_onnx(request["fp32"], request["int8"], images, **request["options"])
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline}
    print(json.dumps(result))
