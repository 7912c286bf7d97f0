"""``mnv3det export``: write an ONNX file of SSDLite or LR-ASPP, optionally its int8 version.

``mnv3det export --model ssdlite|lraspp [--weights CKPT] --output FILE.onnx [--check]
[--int8 --calib-root DIR]``; the graphs are described in :mod:`mnv3det.deploy.onnx`, int8 in
:mod:`mnv3det.deploy.int8` (``--int8`` also writes ``FILE.int8.onnx`` or ``--int8-output``).
``python tools/export.py`` is the same command.

``--format openvino`` writes the ONNX file and its OpenVINO IR (``FILE.xml`` + ``.bin``; with
``--int8`` also ``FILE.int8.xml``), see :mod:`mnv3det.deploy.openvino`.
``--format executorch`` writes an ExecuTorch ``.pte`` instead (XNNPACK; fixed ``--input-size``;
``--int8`` is PT2E int8 into ``FILE.int8.pte``), see :mod:`mnv3det.deploy.executorch`;
``--format litert`` explains why there is no LiteRT file (see ``docs/deployment.md``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from mnv3det.deploy.int8 import CALIBRATION_METHODS, calibration_images, quantize_onnx
from mnv3det.deploy.onnx import check_onnx, export_lraspp, export_ssdlite
from mnv3det.help_format import DefaultsHelpFormatter

__all__ = ["add_model_arguments", "build_model", "main"]


def build_model(args: argparse.Namespace) -> nn.Module:
    """The model an ``export`` command line describes (weights loaded).

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
    """Arguments that pick and build a model (``--model``, ``--arch`` ... ``--weights``)."""
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


def _parse_hw(text: str) -> tuple[int, int]:
    """``"512x1024"`` (or ``"320"``) as ``(height, width)``."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--input-size must be HxW (e.g. 512x1024) or one side, got {text!r}")
    h = int(parts[0])
    return h, int(parts[-1])


def _export_mobile(args: argparse.Namespace) -> int:
    """``--format executorch`` (a ``.pte`` and its settings JSON) or ``--format litert``."""
    from mnv3det.deploy import executorch as et

    if args.format == "litert":
        print(f"mnv3det export: error: {et.LITERT_UNAVAILABLE}", file=sys.stderr)
        return 2
    try:
        model = build_model(args)
        output = Path(args.output)
        if args.model == "ssdlite":
            size = _parse_hw(args.input_size) if args.input_size else tuple(model.size)
        else:
            size = _parse_hw(args.input_size or "512x1024")
        options = {"fuse": not args.no_fuse, "batch": args.batch, "input_size": size}
        if args.model == "ssdlite":
            options.update(
                score_thresh=args.score_thresh,
                nms_thresh=args.nms_thresh,
                topk_candidates=args.topk_candidates,
                detections_per_img=args.detections_per_img,
            )
        export = et.export_ssdlite_pte if args.model == "ssdlite" else et.export_lraspp_pte
        files = [export(model, output, **options)]
        if args.int8:
            images = calibration_images(
                args.model, args.calib_root, args.calib_images, split=args.calib_split, size=size
            )
            int8 = Path(args.int8_output or output.with_suffix(".int8.pte"))
            files.append(export(model, int8, int8=True, calibration=images, **options))
        for path in files:
            print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path}.json")
        if args.check:
            for path in files:
                print(et.check_pte(model, path))
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"mnv3det export: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``mnv3det export``: write an ONNX file (and optionally its int8 version)."""
    parser = argparse.ArgumentParser(
        prog="mnv3det export",
        formatter_class=DefaultsHelpFormatter,
        description="Export SSDLite (with decoding + NMS) or LR-ASPP to ONNX; optionally int8.",
    )
    add_model_arguments(parser)
    parser.add_argument("--output", required=True, help="output .onnx / .xml / .pte file")
    parser.add_argument("--score-thresh", type=float, default=None)
    parser.add_argument("--nms-thresh", type=float, default=None)
    parser.add_argument("--topk-candidates", type=int, default=None)
    parser.add_argument("--detections-per-img", type=int, default=None)
    parser.add_argument("--no-fuse", action="store_true", help="keep BatchNorms in the graph")
    parser.add_argument(
        "--low-res-logits",
        action="store_true",
        help="LR-ASPP: output the stride-8 logits (low_logits) instead of full-size logits; "
        "OnnxSegmenter.predict_labels computes the label map from them (much faster)",
    )
    parser.add_argument("--int8", action="store_true", help="also write a static int8 model")
    parser.add_argument("--int8-output", default=None, help="int8 file (FILE.int8.onnx)")
    parser.add_argument(
        "--calib-root",
        default=None,
        help="--int8: images to calibrate on: a COCO / Cityscapes root (its training images) "
        "or any folder of images (any sizes, read one at a time)",
    )
    parser.add_argument(
        "--calib-split", default=None, help="split folder (default train2017 / train)"
    )
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument(
        "--calibration",
        choices=CALIBRATION_METHODS,
        default="percentile",
        help="--int8: activation ranges from the percentile of |x|, the extremes or the least KL "
        "divergence (measured in docs/deployment.md)",
    )
    parser.add_argument(
        "--calib-percentile", type=float, default=99.99, help="of --calibration percentile"
    )
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
    parser.add_argument(
        "--format",
        choices=("onnx", "openvino", "executorch", "litert"),
        default="onnx",
        help="onnx: .onnx (onnxruntime); openvino: the .onnx and its OpenVINO IR .xml/.bin "
        "(pip install 'mnv3det[openvino]'); executorch: .pte for phones (pip install "
        "'mnv3det[mobile]'); litert: not available (says why)",
    )
    parser.add_argument(
        "--input-size",
        default=None,
        help="executorch: fixed HxW of the program's images (default: SSDLite's size, "
        "LR-ASPP 512x1024)",
    )
    parser.add_argument("--batch", type=int, default=1, help="executorch: images per call")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.low_res_logits and args.model != "lraspp":
        parser.error("--low-res-logits is for --model lraspp")
    if args.int8 and args.calib_root is None:
        parser.error("--int8 needs --calib-root DIR (images to calibrate the activation ranges)")
    if args.format in ("executorch", "litert"):
        return _export_mobile(args)
    try:
        model = build_model(args)
        output = Path(args.output)
        if args.format == "openvino":
            from mnv3det.deploy.openvino import check_ir_path, require_openvino

            require_openvino()  # both before the export, not after it
            ir_output = check_ir_path(output)
            output = output.with_suffix(".onnx")
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
            export_lraspp(model, output, fuse=not args.no_fuse, low_res=args.low_res_logits)
        print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
        written = [output]
        if args.int8:
            int8 = Path(args.int8_output or output.with_suffix(".int8.onnx"))
            images = calibration_images(
                args.model, args.calib_root, args.calib_images, split=args.calib_split
            )
            quantize_onnx(
                output,
                int8,
                images,
                calibration=args.calibration,
                percentile=args.calib_percentile,
                float_prediction_layers=args.float_prediction_layers,
            )
            print(f"wrote {int8} ({int8.stat().st_size / 1e6:.1f} MB)")
            written.append(int8)
        runtime = "onnxruntime"
        if args.format == "openvino":
            written = _convert_openvino(written, ir_output)
            runtime = "openvino"
        if args.check:
            for path in written:
                print(f"{path.name}: {check_onnx(model, path, args.model, runtime=runtime)}")
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"mnv3det export: error: {err}", file=sys.stderr)
        return 2
    return 0


def _convert_openvino(onnx_files: list[Path], ir_output: Path) -> list[Path]:
    """OpenVINO IR of the written ONNX files: ``--output`` for the float one, ``.int8.xml``
    beside it for the int8 one."""
    from mnv3det.deploy.openvino import export_openvino

    written = []
    for i, onnx_file in enumerate(onnx_files):
        xml = ir_output if i == 0 else ir_output.with_suffix(".int8.xml")
        export_openvino(onnx_file, xml)
        size = (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 1e6
        print(f"wrote {xml} + .bin ({size:.1f} MB; OpenVINO IR of {onnx_file.name})")
        written.append(xml)
    return written


if __name__ == "__main__":
    sys.exit(main())
