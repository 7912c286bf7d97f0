"""OpenVINO: our ONNX files as OpenVINO IR, compiled for the CPU (deployment, paper §7).

OpenVINO reads the ONNX graphs of :mod:`mnv3det.deploy.onnx` as they are (SSDLite's decoding
and ``NonMaxSuppression`` included, fp32 or the int8 QDQ file). :func:`export_openvino` writes
them as OpenVINO IR (``.xml`` + ``.bin``, float32 weights), what ``mnv3det export --format
openvino`` produces; :func:`compile_openvino` compiles an ``.onnx`` or ``.xml`` file for the
CPU with the precision, thread and shape settings the benchmark rows use.

Precision is a *runtime* choice, not part of the file: on CPUs with AVX512-BF16 or AMX,
OpenVINO runs float models in bf16 unless told ``INFERENCE_PRECISION_HINT=f32``
(``bf16=False`` here). The accuracy cost of bf16 on the demo data is in docs/deployment.md.

Needs the ``openvino`` extra: ``pip install 'mnv3det[openvino]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_ir_path", "compile_openvino", "export_openvino", "require_openvino"]


def require_openvino() -> Any:
    """The ``openvino`` module, or a :class:`ValueError` that says how to install it."""
    try:
        import openvino
    except ModuleNotFoundError as err:
        raise ValueError(
            "OpenVINO is not installed: pip install 'mnv3det[openvino]' (or pip install openvino)"
        ) from err
    return openvino


def check_ir_path(output: str | Path) -> Path:
    """``output`` as a :class:`~pathlib.Path`, or a :class:`ValueError` when it does not name
    an ``.xml`` file (OpenVINO IR is an ``.xml`` with its weights in the ``.bin`` beside it)."""
    output = Path(output)
    if output.suffix != ".xml":
        raise ValueError(f"OpenVINO IR is written to an .xml file; got {output}")
    return output


def export_openvino(onnx_path: str | Path, output: str | Path) -> Path:
    """Convert an exported ONNX file to OpenVINO IR.

    Args:
        onnx_path: a file of :func:`mnv3det.deploy.onnx.export_ssdlite` /
            :func:`~mnv3det.deploy.onnx.export_lraspp` or its int8 version.
        output: the ``.xml`` file to write (its weights go to the ``.bin`` beside it).

    Returns:
        The ``.xml`` path.
    """
    ov = require_openvino()
    output = check_ir_path(output)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    output.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(output), compress_to_fp16=False)  # keep float32 weights
    return output


def compile_openvino(
    path: str | Path,
    threads: int | None = None,
    bf16: bool | None = None,
    shape: Sequence[int] | None = None,
) -> Any:
    """An ``.onnx`` or ``.xml`` model compiled for the CPU (latency hint).

    Args:
        path: the model file.
        threads: ``INFERENCE_NUM_THREADS`` (``None``: OpenVINO's default, all cores).
        bf16: ``True`` bf16, ``False`` float32 (``INFERENCE_PRECISION_HINT``); ``None`` leaves
            OpenVINO's default (bf16 where the CPU has it).
        shape: a static input shape to compile for (faster than the file's dynamic one).

    Returns:
        An ``openvino.CompiledModel``: ``compiled(images_numpy)`` returns its outputs.
    """
    ov = require_openvino()
    core = ov.Core()
    model = core.read_model(str(path))
    if shape is not None:
        model.reshape({"images": list(shape)})
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if bf16 is not None:
        config["INFERENCE_PRECISION_HINT"] = "bf16" if bf16 else "f32"
    return core.compile_model(model, "CPU", config)
