"""ONNX export of SSDLite (with box decoding and NMS) and LR-ASPP (paper §6.3-§6.4 models).

* SSDLite: the graph of :class:`mnv3det.deploy.wrappers.SSDLiteDeploy`: input ``images``
  ``(N, 3, H, W)`` float32 in ``[0, 1]`` (dynamic batch and size; resized to the model size
  inside), outputs ``boxes (N, D, 4)`` xyxy in input pixels, ``scores (N, D)``, ``labels (N, D)``
  int64 and ``num_detections (N,)``. Decoding and per-(image, class) NMS (ONNX
  ``NonMaxSuppression``) are in the graph; torchvision's SSDLite stops at TopK/NMS export errors,
  this does not.
* LR-ASPP: input ``images`` ``(N, 3, H, W)`` in ``[0, 1]`` (normalisation inside), any batch and
  size; output ``logits (N, C, H, W)``.

The dynamo exporter (``torch.onnx.export(dynamo=True)``) is used, opset 18; the NMS custom op is
translated by :func:`onnx_translation_table`. BatchNorms are folded first
(:func:`mnv3det.deploy.fast.fuse_conv_bn`), so the file holds the inference graph.
:class:`OnnxDetector` / :class:`OnnxSegmenter` run an exported file with the PyTorch models'
calling convention (what the int8 accuracy study validates). The command line is
:mod:`mnv3det.cli.export`; int8 is :mod:`mnv3det.deploy.int8`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.label_map import bilinear_argmax
from heads.ssdlite_postprocess import dense_to_list
from mnv3det.deploy.fast import fuse_conv_bn
from mnv3det.deploy.wrappers import SegmenterDeploy, SSDLiteDeploy
from mnv3det.models.normalize import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "RUNTIMES",
    "ExportError",
    "OnnxDetector",
    "OnnxSegmenter",
    "check_onnx",
    "export_lraspp",
    "export_onnx",
    "export_ssdlite",
    "onnx_session",
    "onnx_translation_table",
]

OPSET = 18
SSDLITE_OUTPUTS = ("boxes", "scores", "labels", "num_detections")


class ExportError(ValueError):
    """A bad export request (unknown model, missing file, unsupported option)."""


# ----------------------------------------------------------------------------- NMS op
def _nms_keep_mask_onnx(boxes, scores, iou_threshold: float, score_threshold: float):
    """ONNX translation of :func:`heads.nms.nms_keep_mask` (onnxscript, opset 18).

    ``NonMaxSuppression`` with boxes ``(B, K, 4)`` and scores ``(B, 1, K)``: onnxruntime treats
    each row as its own batch entry, so this is per-(image, class) NMS without coordinate
    tricks. Its ``(M, 3)`` selected indices are scattered into a ``(B, K)`` mask.
    """
    from onnxscript import opset18 as op

    k = op.Shape(scores, start=1, end=2)
    selected = op.NonMaxSuppression(
        boxes,
        op.Unsqueeze(scores, [1]),
        k,
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
    )
    index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # (M, 2) row, box
    ones = op.Expand(op.Constant(value_floats=[1.0]), op.Shape(selected, start=0, end=1))
    mask = op.ScatterND(op.ConstantOfShape(op.Shape(scores)), index, ones)
    return op.Cast(mask, to=9)  # 9 = BOOL


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export`` covering mnv3det's custom ops."""
    import heads.nms  # noqa: F401  (registers torch.ops.mnv3det.nms_keep_mask)

    return {torch.ops.mnv3det.nms_keep_mask.default: _nms_keep_mask_onnx}


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
    h, w = example_size or model.size
    example = torch.rand(2, 3, h, w)
    return export_onnx(deploy, example, path, SSDLITE_OUTPUTS, dynamic_hw=True)


def export_lraspp(
    model: nn.Module,
    path: str | Path,
    fuse: bool = True,
    example_size: tuple[int, int] = (256, 512),
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    low_res: bool = False,
) -> Path:
    """Export LR-ASPP (ours or torchvision's) with normalisation and dynamic batch/H/W.

    Args:
        model: the segmentation model (left unchanged; a fused copy is exported).
        path: output file.
        fuse: fold BatchNorms into the convolutions first.
        example_size: ``(H, W)`` of the tracing example.
        mean: normalisation mean baked into the graph for a model that does not normalise its
            ``[0, 1]`` input itself (torchvision's; ours does, see
            :class:`~mnv3det.deploy.wrappers.SegmenterDeploy`).
        std: normalisation std for such a model.
        low_res: output ``low_logits`` (the stride-8 logits before the final upsampling)
            instead of full-size ``logits``; :class:`OnnxSegmenter` upsamples them, or computes
            the label map from them directly (:meth:`OnnxSegmenter.predict_labels`).

    Returns:
        The written path.
    """
    model = fuse_conv_bn(model) if fuse else model.eval()
    deploy = SegmenterDeploy(model, mean, std, low_res=low_res)
    example = torch.rand(2, 3, *example_size)
    names = ("low_logits",) if low_res else ("logits",)
    return export_onnx(deploy, example, path, names, dynamic_hw=True)


def check_onnx(
    model: nn.Module, path: str | Path, kind: str, seed: int = 0, runtime: str = "onnxruntime"
) -> str:
    """Run ``path`` (in onnxruntime or OpenVINO) and the PyTorch ``model`` on one random batch.

    Returns:
        A one-line report: detections per image of both (SSDLite) or the largest logit
        difference (LR-ASPP).
    """
    gen = torch.Generator().manual_seed(seed)
    size = tuple(model.size) if kind == "ssdlite" else (256, 512)
    images = torch.rand(2, 3, *size, generator=gen)
    with torch.no_grad():
        if kind == "ssdlite":
            outputs = _OnnxModel(path, runtime=runtime).run(images)
            counts = [len(r["scores"]) for r in model.eval()(images)]
            return f"check: {runtime} detections per image {outputs[3].tolist()}, PyTorch {counts}"
        ref = SegmenterDeploy(model.eval())(images)
    got = OnnxSegmenter(path, runtime=runtime)(images)  # full size, also from low-res logits
    return f"check: {runtime} max |logits difference| = {float((got - ref).abs().max()):.2e}"


# ----------------------------------------------------------------------------- running
def onnx_session(path: str | Path, threads: int | None = None, passive: bool = False):
    """An onnxruntime CPU session with every graph optimisation.

    Args:
        path: the ``.onnx`` file.
        threads: ``intra_op_num_threads`` (``None``: onnxruntime's default).
        passive: threads sleep instead of spinning while they wait (shared machines).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if passive:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


RUNTIMES = ("onnxruntime", "openvino")


class _OnnxModel(nn.Module):
    """An exported graph in onnxruntime or OpenVINO, called like the PyTorch model it came from.

    Args:
        path: the ``.onnx`` file (or, for OpenVINO, its ``.xml`` conversion).
        threads: intra-op threads (``None``: the runtime's default).
        runtime: ``"onnxruntime"`` or ``"openvino"`` (:func:`mnv3det.deploy.openvino.
            compile_openvino`, float32 unless ``bf16``).
        bf16: OpenVINO only: run in bf16 (fast on CPUs with AVX512-BF16 / AMX).
    """

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        runtime: str = "onnxruntime",
        bf16: bool = False,
    ) -> None:
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if bf16 and runtime != "openvino":
            raise ValueError("bf16=True needs runtime='openvino' (onnxruntime runs float32)")
        self.path, self.runtime = Path(path), runtime
        if runtime == "openvino":
            from mnv3det.deploy.openvino import compile_openvino

            self.compiled = compile_openvino(path, threads=threads, bf16=bf16)
            self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        else:
            self.session = onnx_session(path, threads)
            self.output_names = [out.name for out in self.session.get_outputs()]

    def run(self, images: Tensor) -> list[Tensor]:
        """The graph's outputs for ``images (N, 3, H, W)`` in ``[0, 1]``, as CPU tensors."""
        array = images.detach().float().cpu().contiguous().numpy()
        if self.runtime == "openvino":
            # the arrays are views of the compiled model's output buffers, which its next call
            # overwrites: copy them; onnxruntime returns fresh arrays
            result = self.compiled(array)
            outputs = [result[port].copy() for port in self.compiled.outputs]
        else:
            outputs = self.session.run(None, {"images": array})
        return [torch.from_numpy(out) for out in outputs]


class OnnxDetector(_OnnxModel):
    """An SSDLite ONNX export with :class:`~mnv3det.models.ssdlite.SSDLite`'s eval interface:
    ``model(images)`` -> per image ``{"boxes", "scores", "labels"}`` in that image's pixels.

    Args:
        path: the ``.onnx`` file (:func:`export_ssdlite`, fp32 or int8).
        size: the model's network input ``(H, W)`` (tasks check it against the data module).
        num_classes: the model's classes, background included.
        threads: intra-op threads.
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        bf16: OpenVINO in bf16.
    """

    def __init__(
        self,
        path: str | Path,
        size: tuple[int, int],
        num_classes: int,
        threads: int | None = None,
        runtime: str = "onnxruntime",
        bf16: bool = False,
    ) -> None:
        super().__init__(path, threads, runtime, bf16)
        self.size, self.num_classes = tuple(size), num_classes

    def forward(self, images: Tensor | Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of ``(N, 3, H, W)`` or a list of ``(3, H, W)`` images (any sizes)."""
        if isinstance(images, Tensor):
            return dense_to_list(*self.run(images))
        # the graph takes one size per call: run same-size images together, keep the order
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        out: list[dict[str, Tensor]] = [{} for _ in images]
        for indices in groups.values():
            batch = torch.stack([images[i] for i in indices])
            for i, det in zip(indices, dense_to_list(*self.run(batch)), strict=True):
                out[i] = {k: v.to(images[i].device) for k, v in det.items()}
        return out


class OnnxSegmenter(_OnnxModel):
    """An LR-ASPP ONNX export called like the model: ``model(images in [0, 1])`` -> logits.

    A file exported with ``low_res=True`` (output ``low_logits``) is upsampled here, and its
    :meth:`predict_labels` computes the label map from the stride-8 logits
    (:func:`heads.label_map.bilinear_argmax`) instead of upsampling every class.

    Args:
        path: the ``.onnx`` file (:func:`export_lraspp`, fp32 or int8).
        threads: intra-op threads.
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        bf16: OpenVINO in bf16.
    """

    @property
    def low_res(self) -> bool:
        """Whether the file outputs the stride-8 ``low_logits`` (``export_lraspp(low_res=True)``)."""
        return self.output_names[0] == "low_logits"

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, C, H, W)`` on ``images``' device."""
        logits = self.run(images)[0]
        if self.low_res:
            logits = F.interpolate(
                logits, size=images.shape[-2:], mode="bilinear", align_corners=False
            )
        return logits.to(images.device)

    def predict_labels(self, images: Tensor) -> Tensor:
        """``(N, H, W)`` int64 label map (as :meth:`mnv3det.models.lraspp.LRASPP.predict_labels`)."""
        logits = self.run(images)[0]
        if self.low_res:
            return bilinear_argmax(logits, tuple(images.shape[-2:])).to(images.device)
        return logits.argmax(1).to(images.device)
