"""``mnv3det int8-accuracy``: what int8 costs, measured by the tasks' own validation.

For SSDLite (COCO layout) or LR-ASPP (Cityscapes layout) it evaluates three models on the
validation split with ``Trainer.validate`` of :class:`~mnv3det.tasks.detection.DetectionTask` /
:class:`~mnv3det.tasks.segmentation.SegmentationTask` (the same metric code as ``mnv3det
validate``: pycocotools AP / AP50, confusion-matrix mIoU):

* ``pytorch``: the model of ``--weights`` (any checkpoint
  :func:`~mnv3det.models.from_checkpoint.load_model` reads), or, without weights, a model the task
  trains for ``--train-steps`` with ``Trainer.fit`` on the training split;
* ``onnx_fp32``: its ONNX export (:mod:`mnv3det.deploy.onnx`) run by onnxruntime, put in the
  task in place of the PyTorch model (:class:`~mnv3det.deploy.onnx.OnnxDetector` /
  :class:`~mnv3det.deploy.onnx.OnnxSegmenter`);
* ``onnx_int8``: the export quantised by :func:`~mnv3det.deploy.int8.quantize_onnx`, calibrated
  on up to ``--calib-images`` training images; with ``--calibration`` one int8 model per
  calibration recipe (``onnx_int8[minmax]``, ``onnx_int8[percentile:99.9/per-tensor]``, ...),
  each quantised in a subprocess that reports its time and peak memory
  (:func:`~mnv3det.deploy.int8.measure_quantization`).

This module imports both the tasks and :mod:`mnv3det.deploy`, which is why it lives in the CLI
layer (``deploy`` never imports a task).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mnv3det.cli.export import add_model_arguments
from mnv3det.deploy.int8 import CALIBRATION_METHODS, measure_quantization
from mnv3det.deploy.onnx import OnnxDetector, OnnxSegmenter, export_lraspp, export_ssdlite
from mnv3det.help_format import DefaultsHelpFormatter
from mnv3det.models.from_checkpoint import load_model, save_model

__all__ = ["int8_accuracy", "main", "parse_recipe"]

#: The logged validation metrics reported per model (percent).
REPORTED = {"ssdlite": {"AP": "val/map", "AP50": "val/map_50"}, "lraspp": {"mIoU": "val/miou"}}


def _trainer(workdir: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
        **kwargs,
    )


def _data_module(kind: str, root: str | Path, size: int | None, batch_size: int | None):
    if kind == "ssdlite":
        from mnv3det.tasks.detection_data import CocoDataModule

        return CocoDataModule(root, size=size, batch_size=batch_size or 16, num_workers=0, seed=0)
    from mnv3det.tasks.segmentation_data import CityscapesDataModule

    return CityscapesDataModule(
        root, crop_size=(256, 256), batch_size=batch_size or 8, num_workers=0, pin_memory=False
    )


def _task(kind: str, description: dict[str, Any], **training: Any) -> L.LightningModule:
    """The task of ``kind`` for a model of ``description`` (no printed tables)."""
    common = {k: description[k] for k in ("arch", "num_classes", "width_mult", "reduced_tail")} | {
        "print_table": False,
        **training,
    }
    if kind == "ssdlite":
        from mnv3det.tasks.detection import DetectionTask

        return DetectionTask(size=description["size"], **common)
    from mnv3det.tasks.segmentation import SegmentationTask

    return SegmentationTask(
        dilated=description["dilated"], pooling=description["pooling"], **common
    )


def parse_recipe(spec: str) -> dict[str, Any]:
    """``quantize_onnx`` keywords of a calibration recipe ``METHOD[:PERCENTILE][/FLAG...]``.

    Flags: ``per-tensor`` (one weight scale per tensor instead of per channel), ``float-pred``
    (the prediction convolutions stay float). Example: ``percentile:99.9/per-tensor``.

    Raises:
        ValueError: unknown method or flag, or a bad percentile.
    """
    method, *flags = spec.strip().split("/")
    method, _, percentile = method.partition(":")
    if method not in CALIBRATION_METHODS:
        raise ValueError(
            f"calibration recipe {spec!r}: method must be one of {CALIBRATION_METHODS}"
        )
    options: dict[str, Any] = {"calibration": method}
    if percentile:
        if method != "percentile":
            raise ValueError(f"calibration recipe {spec!r}: only percentile takes a number")
        options["percentile"] = float(percentile)
    for flag in flags:
        if flag == "per-tensor":
            options["per_channel"] = False
        elif flag == "float-pred":
            options["float_prediction_layers"] = True
        else:
            raise ValueError(f"calibration recipe {spec!r}: unknown flag {flag!r}")
    return options


def int8_accuracy(
    kind: str,
    root: str | Path,
    workdir: str | Path,
    weights: str | Path | None = None,
    train_steps: int = 300,
    calib: int = 300,
    batch_size: int | None = None,
    float_prediction_layers: bool = False,
    log: Callable[[str], None] = print,
    recipes: Sequence[str] | None = None,
    openvino: bool = False,
    **model_options: Any,
) -> dict[str, dict[str, float]]:
    """Validation metrics of the PyTorch model, its ONNX fp32 export and its int8 version.

    Args:
        kind: ``"ssdlite"`` (COCO-format ``root``) or ``"lraspp"`` (Cityscapes-format ``root``).
        root: data set root (training split calibrates, validation split evaluates).
        workdir: where the model (when trained here) and the ONNX files are written.
        weights: checkpoint to evaluate; ``None`` trains one with the task for ``train_steps``.
        train_steps: optimiser steps of that training.
        calib: calibration images for int8.
        batch_size: batch of the data module (16 detection / 8 segmentation).
        float_prediction_layers: keep SSDLite's prediction convolutions in float.
        log: progress messages.
        recipes: calibration recipes (:func:`parse_recipe`), one int8 model each, named
            ``onnx_int8[RECIPE]``; ``None``: one ``onnx_int8`` with the defaults.
        openvino: also run the fp32 ONNX file in OpenVINO, in float32 and in bf16
            (``openvino_fp32`` / ``openvino_bf16``; needs the ``openvino`` extra).
        **model_options: ``arch``, ``num_classes``, ``width_mult``, ``reduced_tail``, ``size``
            (SSDLite) for :func:`~mnv3det.models.from_checkpoint.load_model` (``None`` = the
            checkpoint's) or the trained model.

    Returns:
        ``{"pytorch" | "onnx_fp32" | "onnx_int8...": {"AP", "AP50"} or {"mIoU"}}`` in percent;
        the int8 entries also hold ``calib_s`` (calibration + quantisation seconds) and
        ``calib_peak_rss_mb`` (peak memory of the subprocess that quantised).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in model_options.items() if v is not None}
    torch.manual_seed(0)
    if weights is not None:
        model = load_model(weights, builder=kind, **options)
        size = model.size[0] if kind == "ssdlite" else None
        data = _data_module(kind, root, size, batch_size)
        task = _task(kind, model.description)
        task.model = model
    else:
        data = _data_module(kind, root, options.get("size", 320), batch_size)
        data.setup("fit")
        build = _untrained_description(kind, data, options)
        task = _task(kind, build, lr=0.05 if kind == "ssdlite" else 0.02, bn_momentum=0.1)
        log(f"[int8-accuracy] training {kind} for {train_steps} steps (no --weights)")
        _trainer(workdir, max_steps=train_steps).fit(task, datamodule=data)
        model = task.model.eval()
        save_model(model, workdir / f"{kind}.pt")
    model.eval()
    if kind == "ssdlite":
        fp32 = export_ssdlite(model, workdir / f"{kind}.onnx")
        onnx_model = lambda path, **kw: OnnxDetector(path, model.size, model.num_classes, **kw)  # noqa: E731
    else:
        fp32 = export_lraspp(model, workdir / f"{kind}.onnx")
        onnx_model = OnnxSegmenter
    int8_models: dict[str, tuple[Path, dict[str, float]]] = {}
    default = {"float_prediction_layers": float_prediction_layers}
    for recipe in recipes or [None]:
        name = "onnx_int8" if recipe is None else f"onnx_int8[{recipe}]"
        options = default if recipe is None else parse_recipe(recipe)
        path = workdir / f"{kind}.int8.onnx"
        if recipe is not None:
            path = path.with_suffix(f".{recipe.replace('/', '_').replace(':', '')}.onnx")
        cost = measure_quantization(
            fp32, path, kind, root, calib, split=data.train_split, **options
        )
        int8_models[name] = (
            path,
            {
                "calib_s": cost["seconds"],
                "calib_peak_rss_mb": cost["peak_rss_mb"],
            },
        )
    results = {}
    candidates = [("pytorch", model, {}), ("onnx_fp32", onnx_model(fp32), {})]
    candidates += [(n, onnx_model(path), cost) for n, (path, cost) in int8_models.items()]
    if openvino:
        for precision in ("fp32", "bf16"):
            runner = onnx_model(fp32, runtime="openvino", bf16=precision == "bf16")
            candidates.append((f"openvino_{precision}", runner, {}))
    for name, candidate, cost in candidates:
        task.model = candidate
        (logged,) = _trainer(workdir).validate(task, datamodule=data, verbose=False)
        results[name] = {k: 100 * float(logged[key]) for k, key in REPORTED[kind].items()} | cost
        log(f"[int8-accuracy] {kind} {name}: {results[name]}")
    task.model = model
    return results


def _untrained_description(kind: str, data: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Build settings of the model trained here: the options, else the builders' defaults."""
    described = {
        "arch": options.get("arch", "large"),
        "num_classes": options.get("num_classes", data.num_classes if kind == "ssdlite" else 19),
        "width_mult": options.get("width_mult", 1.0),
        "reduced_tail": options.get("reduced_tail", kind == "lraspp"),
    }
    if kind == "ssdlite":
        return {**described, "size": options.get("size", 320)}
    return {**described, "dilated": True, "pooling": "global"}


def main(argv: Sequence[str] | None = None) -> int:
    """``mnv3det int8-accuracy``: print (and optionally save) the accuracy of fp32 vs int8."""
    parser = argparse.ArgumentParser(
        prog="mnv3det int8-accuracy",
        formatter_class=DefaultsHelpFormatter,
        description="PyTorch vs ONNX fp32 vs ONNX int8 (AP/AP50 or mIoU) via the tasks' validation",
    )
    add_model_arguments(parser)
    parser.add_argument("--data-root", required=True, help="COCO / Cityscapes layout")
    parser.add_argument("--workdir", required=True, help="where models and ONNX files go")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=None, help="data batch (16 / 8)")
    parser.add_argument(
        "--float-prediction-layers",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SSDLite: keep the prediction convolutions in float (slower; can help a weakly "
        "trained model) instead of quantising them too (default)",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="comma-separated calibration recipes METHOD[:PERCENTILE][/per-tensor][/float-pred], "
        "one int8 model each (e.g. minmax,entropy,percentile:99.9,percentile:99.99/per-tensor); "
        "default: one int8 model with quantize_onnx's defaults",
    )
    parser.add_argument(
        "--openvino",
        action="store_true",
        help="also validate the fp32 ONNX file run by OpenVINO in float32 and in bf16 "
        "(pip install 'mnv3det[openvino]')",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not Path(args.data_root).exists():
        parser.error(f"--data-root {args.data_root} does not exist")
    recipes = None
    if args.calibration:
        recipes = [r.strip() for r in args.calibration.split(",") if r.strip()]
        try:
            [parse_recipe(r) for r in recipes]
        except ValueError as err:
            parser.error(str(err))
    results = int8_accuracy(
        args.model,
        args.data_root,
        args.workdir,
        weights=args.weights,
        train_steps=args.train_steps,
        calib=args.calib_images,
        batch_size=args.batch_size,
        float_prediction_layers=args.float_prediction_layers,
        log=lambda s: print(s, file=sys.stderr),
        recipes=recipes,
        openvino=args.openvino,
        **{k: getattr(args, k) for k in ("arch", "num_classes", "width_mult", "reduced_tail")},
        size=args.size if args.model == "ssdlite" else None,
    )
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
