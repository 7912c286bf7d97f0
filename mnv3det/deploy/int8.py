"""Post-training static int8 quantisation of the exported ONNX graphs (deployment; paper §7).

Why onnxruntime's quantiser and not torchao's PT2E flow: the deployment artefact here is the ONNX
graph (:mod:`mnv3det.deploy.onnx`), and onnxruntime's int8 kernels use this CPU's AVX512-VNNI
instructions directly; PT2E (``torchao.quantization.pt2e`` with ``X86InductorQuantizer``) only
becomes fast after ``torch.compile`` lowers it through Inductor (a C++ toolchain and minutes of
compilation per shape), and its output stays a PyTorch program. torchao is also not a dependency
of this project. See ``docs/deployment.md`` for the measured speed and accuracy.

Recipe: ``onnxruntime.quantization.quantize_static`` in the QDQ format, per-channel int8 weights
(symmetric), uint8 activations calibrated on images from the data module with the 99.99th
percentile of each activation's histogram. The post-processing (softmax, box decoding, top-k, NMS,
the final upsampling of LR-ASPP) is left in float: every node that does not feed a convolution is
excluded from quantisation, and so are the prediction layers (the convolutions whose outputs are
the class logits / box offsets / segmentation logits), so scores and box coordinates keep full
precision and the backbone and head bodies are int8.

Measured on the demo detector (SSDLite-MobileNetV3-Small, 160 px, AP50 10.9 fp32): MinMax
calibration 7.4 AP50, entropy 7.4, percentile 99.9 7.0, 99.999 9.1, 99.99 9.7, and 9.9 with the
prediction layers in float (this recipe). See ``docs/deployment.md``.
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


# ----------------------------------------------------------------------------- accuracy cost
def _onnx_session(path: str | Path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_runner(path: str | Path, convert):
    """``image (3, H, W) tensor -> convert(session outputs)`` for one image."""
    session = _onnx_session(path)

    def run(image):
        return convert(session.run(None, {"images": image[None].numpy()}))

    return run


def _train_briefly(model, loader, steps: int, lr: float, loss_fn, log) -> None:
    """A short SGD + cosine run (for the demo data when no checkpoint is given)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=4e-5)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)),
    )
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 25 == 0 or step == steps:
                log(f"[int8-accuracy] step {step}/{steps} loss {float(loss):.3f}")
            if step >= steps:
                break
    model.eval()


def detection_accuracy(
    root: str | Path,
    workdir: str | Path,
    weights: str | Path | None = None,
    train_steps: int = 300,
    size: int | None = None,
    calib: int = 300,
    batch_size: int = 16,
    arch: str | None = None,
    width_mult: float | None = None,
    reduced_tail: bool | None = None,
    detections_per_img: int = 300,
    float_prediction_layers: bool = False,
    log=print,
) -> dict[str, dict[str, float]]:
    """AP / AP50 of SSDLite on a COCO-format data set: PyTorch, ONNX fp32, ONNX int8.

    The model is rebuilt from ``weights`` by
    :func:`mnv3det.models.from_checkpoint.load_model` (``arch``, ``size`` ... left at ``None``
    come from the checkpoint) or is ``ssdlite(arch, size=size, ...)`` (defaults large, 320)
    with the data set's classes trained for ``train_steps`` on the training split; int8 is
    calibrated on up to ``calib`` training images; all three are evaluated on the validation
    split with :class:`mnv3det.metrics.coco.CocoMetric`.
    """
    import torch

    import mnv3det
    from mnv3det.deploy.wrappers import dense_to_list
    from mnv3det.deploy.onnx import export_ssdlite
    from mnv3det.metrics.coco import CocoMetric
    from mnv3det.models.from_checkpoint import load_model, save_model
    from mnv3det.tasks.detection_data import CocoDataModule

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = None
    if weights is not None:
        model = load_model(
            weights,
            builder="ssdlite",
            arch=arch,
            size=size,
            width_mult=width_mult,
            reduced_tail=reduced_tail,
            detections_per_img=detections_per_img,
        )
        size = model.size[0]
    size = size or 320
    data = CocoDataModule(root, size=size, batch_size=batch_size, num_workers=0, seed=0)
    data.setup("fit")
    torch.manual_seed(0)
    if model is None:
        model = mnv3det.ssdlite(
            arch,
            num_classes=data.num_classes,
            size=size,
            width_mult=width_mult,
            reduced_tail=reduced_tail,
            detections_per_img=detections_per_img,
        )
    elif model.num_classes != data.num_classes:
        raise ValueError(
            f"--weights {weights}: the checkpoint has {model.num_classes} classes but the data "
            f"set at {root} has {data.num_classes}"
        )
    if weights is None:

        def loss_fn(m, batch):
            images, targets = batch
            losses = m(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            return sum(losses.values())

        _train_briefly(model, data.train_dataloader(), train_steps, 0.05, loss_fn, log)
        save_model(
            model,
            workdir / "ssdlite_demo.pt",
            label_map=data.label_to_cat_id,
            class_names=data.class_names,
        )
    model.eval()
    fp32 = export_ssdlite(model, workdir / "ssdlite_demo.onnx")
    images = calibration_images("ssdlite", root, calib, split=data.train_split)
    int8 = quantize_onnx(
        fp32,
        workdir / "ssdlite_demo.int8.onnx",
        images,
        float_prediction_layers=float_prediction_layers,
    )

    val = data.val_dataset
    runners = {
        "pytorch": lambda x: model(x),
        "onnx_fp32": _onnx_runner(fp32, lambda out: dense_to_list(*out)),
        "onnx_int8": _onnx_runner(int8, lambda out: dense_to_list(*out)),
    }
    results = {}
    for name, run in runners.items():
        metric = CocoMetric(val.coco, data.label_to_cat_id)
        with torch.no_grad():
            for index in range(len(val)):
                image, target = val[index]
                dets = run(image) if name != "pytorch" else run([image])
                metric.update(dets, [target])
        stats = metric.compute()
        results[name] = {"AP": 100 * stats["map"], "AP50": 100 * stats["map_50"]}
        log(f"[int8-accuracy] ssdlite {name}: {results[name]}")
    return results


def segmentation_accuracy(
    root: str | Path,
    workdir: str | Path,
    weights: str | Path | None = None,
    train_steps: int = 300,
    calib: int = 300,
    batch_size: int = 8,
    crop: tuple[int, int] = (256, 256),
    arch: str | None = None,
    width_mult: float | None = None,
    reduced_tail: bool | None = None,
    log=print,
) -> dict[str, dict[str, float]]:
    """mIoU of LR-ASPP (19 classes) on a Cityscapes-format data set: PyTorch, ONNX fp32/int8.

    Same protocol as :func:`detection_accuracy`; :class:`mnv3det.metrics.segmentation.
    SegmentationMetrics` on the full-size validation images; ``weights`` are read by
    :func:`mnv3det.models.from_checkpoint.load_model`.
    """
    import torch
    import torch.nn.functional as F

    import mnv3det
    from mnv3det.deploy.wrappers import SegmenterDeploy
    from mnv3det.deploy.onnx import export_lraspp
    from mnv3det.metrics.segmentation import SegmentationMetrics
    from mnv3det.tasks.segmentation_data import CityscapesDataModule

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = CityscapesDataModule(
        root, crop_size=crop, batch_size=batch_size, num_workers=0, pin_memory=False
    )
    torch.manual_seed(0)
    if weights is not None:
        from mnv3det.models.from_checkpoint import load_model

        model = load_model(
            weights,
            builder="lraspp",
            arch=arch,
            num_classes=19,
            width_mult=width_mult,
            reduced_tail=reduced_tail,
        )
    else:
        model = mnv3det.lraspp(
            arch, num_classes=19, width_mult=width_mult, reduced_tail=reduced_tail
        )
    deploy = SegmenterDeploy(model)  # normalisation + model (shares the model's parameters)
    if weights is None:

        def loss_fn(_, batch):
            images, masks = batch
            return F.cross_entropy(
                deploy.model((images - deploy.mean) / deploy.std), masks, ignore_index=255
            )

        _train_briefly(model, data.train_dataloader(), train_steps, 0.02, loss_fn, log)
        from mnv3det.models.from_checkpoint import save_model

        save_model(model, workdir / "lraspp_demo.pt")
    model.eval()
    fp32 = export_lraspp(model, workdir / "lraspp_demo.onnx")
    images = calibration_images("lraspp", root, calib, split=data.train_split)
    int8 = quantize_onnx(fp32, workdir / "lraspp_demo.int8.onnx", images)

    val = data.val_dataset
    runners = {
        "pytorch": lambda x: deploy(x[None]),
        "onnx_fp32": _onnx_runner(fp32, lambda out: torch.from_numpy(out[0])),
        "onnx_int8": _onnx_runner(int8, lambda out: torch.from_numpy(out[0])),
    }
    results = {}
    for name, run in runners.items():
        metric = SegmentationMetrics(num_classes=19)
        with torch.no_grad():
            for index in range(len(val)):
                image, mask = val[index]
                metric.update(run(image).argmax(1), mask[None])
        results[name] = {"mIoU": 100 * float(metric.compute()["miou"])}
        log(f"[int8-accuracy] lraspp {name}: {results[name]}")
    return results


def main(argv=None) -> int:
    """``python -m mnv3det.deploy.int8``: measure the int8 accuracy cost on a data set."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m mnv3det.deploy.int8",
        description="fp32 vs int8 accuracy (AP/AP50 or mIoU) of the exported ONNX models",
    )
    parser.add_argument("--model", choices=("ssdlite", "lraspp"), required=True)
    parser.add_argument("--data-root", required=True, help="COCO / Cityscapes layout")
    parser.add_argument("--workdir", required=True, help="where models and ONNX files go")
    parser.add_argument("--weights", default=None, help="trained checkpoint (else train)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (16 / 8)")
    parser.add_argument(
        "--arch", choices=("large", "small"), default=None, help="checkpoint's, or large"
    )
    parser.add_argument("--width-mult", type=float, default=None, help="checkpoint's, or 1.0")
    parser.add_argument(
        "--reduced-tail",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: read from --weights, else False for SSDLite, True for LR-ASPP",
    )
    parser.add_argument(
        "--size", type=int, default=None, help="SSDLite input side (checkpoint's, or 320)"
    )
    parser.add_argument("--detections-per-img", type=int, default=300)
    parser.add_argument(
        "--float-prediction-layers",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SSDLite: keep the prediction convolutions in float (slower; can help a weakly "
        "trained model) instead of quantising them too (default)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not Path(args.data_root).exists():
        parser.error(f"--data-root {args.data_root} does not exist")
    common = dict(weights=args.weights, train_steps=args.train_steps, calib=args.calib_images)
    if args.batch_size:
        common["batch_size"] = args.batch_size
    common.update(arch=args.arch, width_mult=args.width_mult)
    if args.reduced_tail is not None:
        common["reduced_tail"] = args.reduced_tail
    if args.model == "ssdlite":
        results = detection_accuracy(
            args.data_root,
            args.workdir,
            size=args.size,
            detections_per_img=args.detections_per_img,
            float_prediction_layers=args.float_prediction_layers,
            **common,
        )
    else:
        results = segmentation_accuracy(args.data_root, args.workdir, **common)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
