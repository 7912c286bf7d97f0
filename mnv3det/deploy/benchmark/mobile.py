"""The benchmark's ExecuTorch rows: ``executorch_fp32`` / ``executorch_int8``.

:func:`prepare_executorch` writes the ``.pte`` programs of our model (batch 1, the benchmark's
image size; int8 calibrated on random images as the ONNX int8 row is) and
:func:`executorch_runner` times them in ExecuTorch's Python runtime with the XNNPACK thread pool
sized to ``--threads``. A batch of N images is N calls of the batch-1 program (what an app
does with camera frames). SSDLite: *network* is the program (pre-processing, layers, box
decoding and per-class top-k inside), *post* is :func:`mnv3det.deploy.executorch.select_detections`
(NMS and the final top-k, in Python); LR-ASPP: the program gives logits, *post* the argmax.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["EXECUTORCH_CONFIGS", "executorch_runner", "prepare_executorch"]

EXECUTORCH_CONFIGS = ("executorch_fp32", "executorch_int8")


def prepare_executorch(
    kind: str,
    model: nn.Module,
    workdir: Path,
    input_size: tuple[int, int],
    calib: int,
    configs: Sequence[str],
) -> dict[str, str]:
    """The ``.pte`` files of the ExecuTorch configurations among ``configs``.

    Args:
        kind: ``"ssdlite"`` or ``"lraspp"``.
        model: our model (the benchmark's weights).
        workdir: where the files go.
        input_size: ``(H, W)`` of the benchmark images (the programs' fixed size).
        calib: int8 calibration images (random, at ``input_size``).
        configs: the configurations that will run.

    Returns:
        ``{config: path}`` for each ExecuTorch configuration in ``configs``.
    """
    from mnv3det.deploy.executorch import export_lraspp_pte, export_ssdlite_pte

    export = export_ssdlite_pte if kind == "ssdlite" else export_lraspp_pte
    files = {}
    gen = torch.Generator().manual_seed(3)
    for config in EXECUTORCH_CONFIGS:
        if config not in configs:
            continue
        int8 = config.endswith("int8")
        images = (torch.rand(3, *input_size, generator=gen) for _ in range(calib))
        path = workdir / f"{kind}.{'int8.' if int8 else ''}pte"
        export(model, path, input_size=input_size, int8=int8, calibration=images)
        if int8:
            _check_loads(path)
        files[config] = str(path)
    return files


def _check_loads(path: Path) -> None:
    """Load ``path`` in a subprocess: XNNPACK refuses some int8 programs of degenerate random
    weights at load time (``xnn_status_unsupported_parameter``, then the process aborts)."""
    code = f"from mnv3det.deploy.executorch import load_method; load_method({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "XNN" in ln or "Error" in ln]
        raise RuntimeError(
            f"the int8 ExecuTorch program {path} does not load ({'; '.join(lines[-2:])}); "
            "with random weights use --random-bn (realistic activation ranges)"
        )


def executorch_runner(spec: dict) -> tuple[Callable, Callable]:
    """``(end_to_end(images), stages(images))`` of an ExecuTorch configuration (see the
    module docstring); ``spec[config]`` is the ``.pte`` of :func:`prepare_executorch`."""
    from mnv3det.deploy.executorch import (
        load_method,
        read_settings,
        select_detections,
        set_threads,
    )

    path = spec[spec["config"]]
    set_threads(spec["threads"])
    method = load_method(path)
    settings = read_settings(path)

    def program(x: Tensor) -> list[list[Tensor]]:
        return [list(method.execute([x[i : i + 1].contiguous()])) for i in range(len(x))]

    if spec["model"] == "ssdlite":

        def post(outputs: list[list[Tensor]]) -> list:
            return [
                select_detections(
                    boxes,
                    scores,
                    settings["nms_thresh"],
                    settings["score_thresh"],
                    settings["detections_per_img"],
                    settings["box_scale"],
                )
                for boxes, scores in outputs
            ]

    else:

        def post(outputs: list[list[Tensor]]) -> list:
            return [logits.argmax(1) for (logits,) in outputs]

    def e2e(x: Tensor) -> list:
        return post(program(x))

    def stages(x: Tensor) -> list[tuple[str, Callable]]:
        outputs = program(x)
        return [("network", lambda: program(x)), ("post", lambda: post(outputs))]

    return e2e, stages
