"""ONNX export of SSDLite (with box decoding and NMS) and LR-ASPP (paper §6.3-§6.4 models).

``mnv3det export --model ssdlite|lraspp [--weights CKPT] --output FILE.onnx [--int8 --calib-root DIR]``

* SSDLite: the graph of :class:`mnv3det.deploy.SSDLiteDeploy`: input ``images`` ``(N, 3, H, W)``
  float32 in ``[0, 1]`` (dynamic batch and size; resized to the model size inside), outputs
  ``boxes (N, D, 4)`` xyxy in input pixels, ``scores (N, D)``, ``labels (N, D)`` int64 and
  ``num_detections (N,)``. Decoding and per-(image, class) NMS (ONNX ``NonMaxSuppression``) are
  in the graph; torchvision's SSDLite stops at TopK/NMS export errors, this does not.
* LR-ASPP: input ``images`` ``(N, 3, H, W)`` in ``[0, 1]`` (ImageNet normalisation inside), any
  batch and size; output ``logits (N, C, H, W)``.

The dynamo exporter (``torch.onnx.export(dynamo=True)``) is used, opset 18; the NMS custom op is
translated by :func:`mnv3det.deploy.onnx_translation_table`. BatchNorms are folded first
(:func:`mnv3det.deploy.fast.fuse_conv_bn`), so the file holds the inference graph. ``--int8``
also writes ``FILE.int8.onnx`` (or ``--int8-output``) with :mod:`mnv3det.deploy.int8`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mnv3det.deploy.wrappers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmenterDeploy,
    SSDLiteDeploy,
    onnx_translation_table,
)
from mnv3det.deploy.fast import fuse_conv_bn

__all__ = ["ExportError", "export_lraspp", "export_onnx", "export_ssdlite", "main"]

OPSET = 18
SSDLITE_OUTPUTS = ("boxes", "scores", "labels", "num_detections")


class ExportError(ValueError):
    """A bad export request (unknown model, missing file, unsupported option)."""


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ModuleNotFoundError as err:
        raise ExportError(
            f"ONNX export needs the 'export' extra ({err.name} is missing): "
            "pip install 'mnv3det[export]'"
        ) from err


def export_onnx(
    module: nn.Module,
    example: Tensor,
    path: str | Path,
    output_names: Sequence[str],
    dynamic_hw: bool = True,
    quiet: bool = True,
) -> Path:
    """Export ``module(images)`` with a dynamic batch (and height/width) to ``path``.

    Args:
        module: an eval-mode module taking one ``(N, 3, H, W)`` tensor.
        example: an example input (its values do not matter; shapes are made dynamic).
        path: output ``.onnx`` file (parent folders are created).
        output_names: names of the graph outputs.
        dynamic_hw: make height and width dynamic too (32..4096).
        quiet: silence the exporter's progress messages.

    Returns:
        The written path.
    """
    _require_onnx()
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = {0: Dim("batch", min=1, max=1024)}
    if dynamic_hw:
        dims.update({2: Dim("height", min=32, max=4096), 3: Dim("width", min=32, max=4096)})
    module = module.eval()
    sink = io.StringIO()
    redirect = contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()
    level = logging.getLogger("torch.onnx").level
    if quiet:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with redirect, torch.no_grad():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=list(output_names),
                dynamic_shapes=(dims,),
                custom_translation_table=onnx_translation_table(),
                opset_version=OPSET,
                verbose=False,
            )
    finally:
        logging.getLogger("torch.onnx").setLevel(level)
    program.save(str(path))
    return path


def export_ssdlite(
    model: nn.Module,
    path: str | Path,
    fuse: bool = True,
    example_size: tuple[int, int] | None = None,
    **deploy_kwargs: float | int | None,
) -> Path:
    """Export an :class:`mnv3det.models.ssdlite.SSDLite` with pre/post-processing in the graph.

    Args:
        model: the detector (left unchanged; a fused copy is exported).
        path: output file.
        fuse: fold BatchNorms into the convolutions first.
        example_size: ``(H, W)`` of the tracing example (default: the model size).
        **deploy_kwargs: ``score_thresh``, ``nms_thresh``, ``topk_candidates``,
            ``detections_per_img`` overrides (see :class:`~mnv3det.deploy.SSDLiteDeploy`).

    Returns:
        The written path.
    """
    model = fuse_conv_bn(model) if fuse else model.eval()
    deploy = SSDLiteDeploy(model, **deploy_kwargs)
    h, w = example_size or deploy.size
    example = torch.rand(2, 3, h, w)
    return export_onnx(deploy, example, path, SSDLITE_OUTPUTS, dynamic_hw=True)


def export_lraspp(
    model: nn.Module,
    path: str | Path,
    fuse: bool = True,
    example_size: tuple[int, int] = (256, 512),
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Path:
    """Export LR-ASPP (ours or torchvision's) with normalisation and dynamic batch/H/W.

    Args:
        model: the segmentation model (left unchanged; a fused copy is exported).
        path: output file.
        fuse: fold BatchNorms into the convolutions first.
        example_size: ``(H, W)`` of the tracing example.
        mean: normalisation mean baked into the graph.
        std: normalisation std baked into the graph.

    Returns:
        The written path.
    """
    model = fuse_conv_bn(model) if fuse else model.eval()
    deploy = SegmenterDeploy(model, mean, std)
    example = torch.rand(2, 3, *example_size)
    return export_onnx(deploy, example, path, ("logits",), dynamic_hw=True)


# ----------------------------------------------------------------------------- CLI
def build_model(args: argparse.Namespace) -> nn.Module:
    """The model an ``export``/``benchmark`` command line describes (weights loaded).

    With ``--weights`` the model is rebuilt from the checkpoint by
    :func:`mnv3det.models.from_checkpoint.load_model` (its description or, for torchvision's
    files, the tensor shapes give every setting); options given on the command line must agree
    with it. Without weights the builders' defaults apply.
    """
    from mnv3det.models.from_checkpoint import load_model

    options = {
        "arch": getattr(args, "arch", None),
        "num_classes": getattr(args, "num_classes", None),
        "width_mult": getattr(args, "width_mult", None),
        "reduced_tail": getattr(args, "reduced_tail", None),
    }
    if args.model == "ssdlite":
        options["size"] = getattr(args, "size", None)
    if args.weights is not None:
        return load_model(args.weights, builder=args.model, **options)
    options = {k: v for k, v in options.items() if v is not None}
    if args.model == "ssdlite":
        from mnv3det.models.ssdlite import ssdlite

        return ssdlite(**options).eval()
    from mnv3det.models.lraspp import lraspp

    return lraspp(**options).eval()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments that pick and build a model (shared with ``mnv3det benchmark``)."""
    parser.add_argument("--model", choices=("ssdlite", "lraspp"), required=True)
    parser.add_argument(
        "--arch", choices=("large", "small"), default=None, help="default: checkpoint's, or large"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="with background for SSDLite (default: checkpoint's, or 91 / 19)",
    )
    parser.add_argument(
        "--width-mult", type=float, default=None, help="default: checkpoint's, or 1.0"
    )
    parser.add_argument(
        "--reduced-tail",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="halve the last stage (default: read from --weights, else LR-ASPP True, SSDLite "
        "False)",
    )
    parser.add_argument(
        "--size", type=int, default=None, help="SSDLite input side (default: checkpoint's, or 320)"
    )
    parser.add_argument(
        "--weights",
        "--checkpoint",
        dest="weights",
        default=None,
        help="checkpoint: torchvision's, an mnv3det weights file or a Lightning .ckpt; the model "
        "is rebuilt from it (architecture, size, classes)",
    )


def _fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    return args  # the builders (and the checkpoint's description) fill in what is not given


def main(argv: Sequence[str] | None = None) -> int:
    """``mnv3det export``: write an ONNX file (and optionally its int8 version)."""
    parser = argparse.ArgumentParser(
        prog="mnv3det export",
        description="Export SSDLite (with decoding + NMS) or LR-ASPP to ONNX; optionally int8.",
    )
    add_model_arguments(parser)
    parser.add_argument("--output", required=True, help="output .onnx file")
    parser.add_argument("--score-thresh", type=float, default=None)
    parser.add_argument("--nms-thresh", type=float, default=None)
    parser.add_argument("--topk-candidates", type=int, default=None)
    parser.add_argument("--detections-per-img", type=int, default=None)
    parser.add_argument("--no-fuse", action="store_true", help="keep BatchNorms in the graph")
    parser.add_argument("--int8", action="store_true", help="also write a static int8 model")
    parser.add_argument("--int8-output", default=None, help="int8 file (FILE.int8.onnx)")
    parser.add_argument(
        "--calib-root", default=None, help="data set root (COCO / Cityscapes layout) for --int8"
    )
    parser.add_argument("--calib-split", default=None, help="split to calibrate on (train)")
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument(
        "--float-prediction-layers",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="--int8: keep the prediction convolutions in float (slower; can help a weakly "
        "trained model) instead of quantising them too (default; see docs/deployment.md)",
    )
    parser.add_argument(
        "--check", action="store_true", help="run onnxruntime on random images and compare"
    )
    args = _fill_defaults(parser.parse_args(list(argv) if argv is not None else None))
    if args.int8 and args.calib_root is None:
        parser.error("--int8 needs --calib-root DIR (images to calibrate the activation ranges)")
    try:
        model = build_model(args)
        output = Path(args.output)
        if args.model == "ssdlite":
            export_ssdlite(
                model,
                output,
                fuse=not args.no_fuse,
                score_thresh=args.score_thresh,
                nms_thresh=args.nms_thresh,
                topk_candidates=args.topk_candidates,
                detections_per_img=args.detections_per_img,
            )
        else:
            meta = getattr(model, "meta", {})
            export_lraspp(
                model,
                output,
                fuse=not args.no_fuse,
                mean=tuple(meta.get("mean", IMAGENET_MEAN)),
                std=tuple(meta.get("std", IMAGENET_STD)),
            )
        print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
        if args.check:
            print(check_onnx(model, output, args.model))
        if args.int8:
            from mnv3det.deploy.int8 import calibration_images, quantize_onnx

            int8 = Path(args.int8_output or output.with_suffix(".int8.onnx"))
            images = calibration_images(
                args.model, args.calib_root, args.calib_images, split=args.calib_split
            )
            quantize_onnx(
                output, int8, images, float_prediction_layers=args.float_prediction_layers
            )
            print(f"wrote {int8} ({int8.stat().st_size / 1e6:.1f} MB)")
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"mnv3det export: error: {err}", file=sys.stderr)
        return 2
    return 0


def check_onnx(model: nn.Module, path: str | Path, kind: str, seed: int = 0) -> str:
    """Run ``path`` in onnxruntime and the PyTorch ``model`` on the same random batch."""
    import numpy as np
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    size = tuple(model.size) if kind == "ssdlite" else (256, 512)
    images = torch.rand(2, 3, *size, generator=gen)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        if kind == "ssdlite":
            ref = model.eval()(images)
            counts = [len(r["scores"]) for r in ref]
            return (
                f"check: onnxruntime detections per image {outputs[3].tolist()}, PyTorch {counts}"
            )
        ref = SegmenterDeploy(model.eval())(images).numpy()
    return f"check: max |logits difference| = {float(np.abs(outputs[0] - ref).max()):.2e}"


if __name__ == "__main__":
    sys.exit(main())
