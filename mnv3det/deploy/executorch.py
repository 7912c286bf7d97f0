"""ExecuTorch export of SSDLite and LR-ASPP: ``.pte`` programs for phones (paper §6.3-§6.4, §7).

MobileNetV3 was searched for phone CPUs; PyTorch's on-device runtime is ExecuTorch, whose
XNNPACK backend runs convolutions on ARM and x86 CPUs. This module writes one ``.pte`` file per
model, fp32 or int8, with a fixed input size chosen at export:

* **LR-ASPP**: ``images (B, 3, H, W)`` float32 in ``[0, 1]`` -> ``logits (B, C, H, W)``; the
  normalisation is inside (:class:`~mnv3det.deploy.wrappers.SegmenterDeploy`). The label map is
  ``logits.argmax(1)``.
* **SSDLite**: ``images (B, 3, H, W)`` in ``[0, 1]`` -> ``boxes (B, C-1, K, 4)`` xyxy in network-
  input pixels and ``scores (B, C-1, K)``: the per-class candidates of SSD's post-processing
  (pre-processing, layers, softmax, box decoding and clipping, the score threshold and each
  class's top ``K = topk_candidates``, all inside the program; :class:`SSDLiteCandidates`).
  Non-maximum suppression is **not** in the program: ExecuTorch's kernel library has no NMS op
  (``torchvision::nms`` and mnv3det's :func:`heads.nms.nms_keep_mask` would need a custom C++
  kernel compiled into the app's runtime), and a greedy NMS does not trace to fixed-shape
  tensor ops. :func:`select_detections` is the rest, a few lines to port (the README has it as
  pseudo-code): per class, greedy NMS over the candidates (already sorted by score); then the
  ``detections_per_img`` best of all classes; then boxes times the image/network size ratio.

A JSON file beside the program (``model.pte.json``, :func:`read_settings`) holds what the app
needs to call it: input size, network size, thresholds, class names, output names.

int8: ExecuTorch's PT2E flow (``prepare_pt2e`` with ``XNNPACKQuantizer``, symmetric per-channel
int8 weights and int8 activations, ``convert_pt2e``), calibrated on images of the data set
through :func:`mnv3det.deploy.int8.calibration_images` (the ONNX int8 path's calibration set),
read one at a time. For SSDLite only the network (normalisation, backbone, heads) is quantised;
the box decoding and scores stay float, as in the ONNX int8 graph.

:class:`ExecuTorchDetector` / :class:`ExecuTorchSegmenter` run a ``.pte`` in ExecuTorch's Python
runtime with the PyTorch models' calling convention (tests, the int8 accuracy measurement, the
benchmark). Needs the ``mobile`` extra: ``pip install 'mnv3det[mobile]'`` (``executorch``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.nms import nms_keep_mask
from heads.ssdlite_postprocess import decode_boxes, dense_to_list
from mnv3det.deploy.fast import fuse_conv_bn
from mnv3det.deploy.onnx import ExportError
from mnv3det.deploy.wrappers import SegmenterDeploy, SSDLiteDeploy

__all__ = [
    "LITERT_UNAVAILABLE",
    "SSDLITE_PTE_OUTPUTS",
    "ExecuTorchDetector",
    "ExecuTorchSegmenter",
    "SSDLiteCandidates",
    "check_pte",
    "export_lraspp_pte",
    "export_pte",
    "export_ssdlite_pte",
    "load_method",
    "read_settings",
    "select_detections",
    "set_threads",
    "ssdlite_candidates",
]

#: Why ``mnv3det export --format litert`` writes nothing (see ``docs/deployment.md``).
LITERT_UNAVAILABLE = (
    "LiteRT export is not wired in: litert-torch 0.10.0 converts both models (tried: LR-ASPP "
    "logits equal to 1e-7), but it installs ~930 MB (jax, transformers, litert-converter) and "
    "its xdsl dependency pins typing-extensions<4.13, which conflicts with executorch's "
    "(cattrs needs >=4.14), so it cannot share an environment with the 'mobile' extra; see "
    "docs/deployment.md ('On device'). Use --format executorch or onnx"
)

#: Output names of the SSDLite program, in order.
SSDLITE_PTE_OUTPUTS = ("boxes", "scores")


def require_executorch() -> None:
    """Raise :class:`~mnv3det.deploy.onnx.ExportError` naming the extra when ExecuTorch is missing."""
    try:
        import executorch.exir  # noqa: F401
    except ModuleNotFoundError as err:
        raise ExportError(
            f"ExecuTorch export needs the 'mobile' extra ({err.name} is missing): "
            "pip install 'mnv3det[mobile]'"
        ) from err


# ----------------------------------------------------------------------------- SSDLite split
def ssdlite_candidates(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    image_size: tuple[int, int],
    box_coder_weights: Sequence[float],
    score_thresh: float,
    topk_candidates: int,
) -> tuple[Tensor, Tensor]:
    """The part of SSD's post-processing before NMS, on fixed-shape tensors (in the program).

    The same operations as the first half of
    :func:`heads.ssdlite_postprocess.dense_postprocess` (so the candidates equal the eager
    model's): decode and clip the boxes, softmax, foreground scores at or below
    ``score_thresh`` set to -1, each (image, class)'s ``topk_candidates`` best, their boxes.

    Args:
        cls_logits: ``(N, A, C)`` (class 0 = background).
        bbox_regression: ``(N, A, 4)``.
        anchors: ``(A, 4)`` xyxy in network-input pixels.
        image_size: ``(H, W)`` of the network input (boxes are clipped to it).
        box_coder_weights: ``(wx, wy, ww, wh)``.
        score_thresh: minimum class probability.
        topk_candidates: candidates ``K`` per (image, class).

    Returns:
        ``boxes (N, C-1, K, 4)`` and ``scores (N, C-1, K)``, each row sorted by decreasing score;
        ``-1`` marks a candidate below the threshold. Class ``j`` of the rows is label ``j + 1``.
    """
    n, a, _ = cls_logits.shape
    boxes = decode_boxes(bbox_regression, anchors, box_coder_weights, image_size)
    fg = F.softmax(cls_logits, dim=-1)[..., 1:].transpose(1, 2)
    k = min(topk_candidates, a)
    scores, top_anchor = fg.masked_fill(fg <= score_thresh, -1.0).topk(k, dim=2)
    offsets = (torch.arange(n, device=boxes.device) * a).view(n, 1, 1)
    cand = boxes.reshape(-1, 4)[(top_anchor + offsets).reshape(-1)]
    return cand.view(n, -1, k, 4), scores


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    nms_thresh: float,
    score_thresh: float,
    detections_per_img: int,
    scale: Tensor | Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NMS and the final selection on the program's candidates (the part outside the program).

    The second half of :func:`heads.ssdlite_postprocess.dense_postprocess` (same ops, so the
    detections equal the eager model's): greedy NMS inside each (image, class) row
    (:func:`heads.nms.nms_keep_mask`, torchvision's kernel), then each image's
    ``detections_per_img`` best kept candidates over all classes, labels ``class row + 1``,
    boxes times ``scale``.

    Args:
        boxes: ``(N, C-1, K, 4)`` candidates of :func:`ssdlite_candidates` (tensors or arrays).
        scores: ``(N, C-1, K)``.
        nms_thresh: IoU above which a lower-scoring box of the same class is dropped.
        score_thresh: scores at or below it are never kept.
        detections_per_img: output rows ``D`` per image.
        scale: ``(sx, sy, sx, sy)`` factors from network-input to image pixels, or ``(N, 1, 4)``.

    Returns:
        ``(boxes (N, D, 4), scores (N, D), labels (N, D) int64, num_detections (N,))`` as
        :func:`~heads.ssdlite_postprocess.dense_postprocess`; rows past ``num_detections`` are
        zeros.
    """
    boxes, scores = torch.as_tensor(boxes), torch.as_tensor(scores)
    n, groups, k = scores.shape
    keep = nms_keep_mask(boxes.reshape(-1, k, 4), scores.reshape(-1, k), nms_thresh, score_thresh)
    kept_scores = torch.where(keep.view(n, -1), scores.reshape(n, -1), -1.0)
    d = min(detections_per_img, groups * k)
    top, index = kept_scores.topk(d, dim=1)
    valid = top > score_thresh
    labels = torch.div(index, k, rounding_mode="floor") + 1
    out = boxes.reshape(n, -1, 4).gather(1, index.unsqueeze(-1).expand(n, d, 4))
    if scale is not None:
        out = out * torch.as_tensor(scale, dtype=out.dtype)
    return (
        torch.where(valid.unsqueeze(-1), out, 0.0),
        torch.where(valid, top, 0.0),
        torch.where(valid, labels, 0),
        valid.sum(dim=1),
    )


class _SSDLiteNetwork(nn.Module):
    """Pre-processing and layers of an SSDLite: ``images -> (cls_logits, bbox_regression)``."""

    def __init__(self, deploy: SSDLiteDeploy) -> None:
        super().__init__()
        self.deploy = deploy

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.deploy.network(images)


class SSDLiteCandidates(nn.Module):
    """What the SSDLite program computes: ``images -> (boxes, scores)`` candidates.

    Args:
        model: an :class:`mnv3det.models.ssdlite.SSDLite` (eval mode; fused or not).
        network: the module mapping images to ``(cls_logits, bbox_regression)``; default the
            model's own (transform and layers). The int8 export passes the quantised one.
        score_thresh: override of the model's minimum score.
        topk_candidates: override of the candidates per class.
    """

    def __init__(
        self,
        model: nn.Module,
        network: nn.Module | None = None,
        score_thresh: float | None = None,
        topk_candidates: int | None = None,
    ) -> None:
        super().__init__()
        deploy = SSDLiteDeploy(model)
        self.network = network if network is not None else _SSDLiteNetwork(deploy)
        with torch.no_grad():
            _, anchors = model.head_outputs(model.transform(torch.zeros(1, 3, *model.size)))
        self.register_buffer("anchors", anchors)
        self.size = tuple(model.size)
        self.weights = tuple(float(w) for w in model.box_coder.weights)
        self.score_thresh = model.score_thresh if score_thresh is None else score_thresh
        self.topk_candidates = topk_candidates or model.topk_candidates

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Candidates ``(boxes (N, C-1, K, 4), scores (N, C-1, K))`` for ``images`` in [0, 1]."""
        cls_logits, bbox_regression = self.network(images)
        return ssdlite_candidates(
            cls_logits,
            bbox_regression,
            self.anchors,
            self.size,
            self.weights,
            self.score_thresh,
            self.topk_candidates,
        )


# ----------------------------------------------------------------------------- export
def _calibrate_quantise(
    module: nn.Module, example: Tensor, images: Iterable, per_channel: bool = True
) -> nn.Module:
    """PT2E int8 of ``module`` with ``XNNPACKQuantizer``, calibrated image by image.

    Args:
        module: eval-mode module taking ``(B, 3, H, W)``.
        example: an input of the exported shape; calibration images are resized to its size.
        images: ``(3, h, w)`` float images in ``[0, 1]`` (arrays or tensors; read lazily, one at
            a time, so a generator keeps memory bounded).
        per_channel: per-output-channel weight scales (depthwise convolutions need them).

    Returns:
        The converted (quantised) module.

    Raises:
        ValueError: no calibration image was given.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    graph = torch.export.export(module, (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    count, pending = 0, []
    with torch.no_grad():
        for image in images:
            batch = torch.as_tensor(np.asarray(image, dtype=np.float32))
            batch = batch[None] if batch.dim() == 3 else batch
            if batch.shape[-2:] != example.shape[-2:]:
                batch = F.interpolate(
                    batch, size=example.shape[-2:], mode="bilinear", align_corners=False
                )
            pending.extend(batch)
            while len(pending) >= len(example):  # the exported batch size
                prepared(torch.stack(pending[: len(example)]))
                del pending[: len(example)]
                count += 1
        if pending and count == 0:  # fewer images than one batch: repeat the last
            pending += pending[-1:] * (len(example) - len(pending))
            prepared(torch.stack(pending))
            count += 1
    if count == 0:
        raise ValueError("export_pte: int8 needs calibration images; none were given")
    return convert_pt2e(prepared)


def export_pte(module: nn.Module, example: Tensor, path: str | Path) -> Path:
    """``torch.export`` -> XNNPACK-lowered ExecuTorch program -> ``path`` (a ``.pte``).

    Args:
        module: eval-mode module (float or PT2E-quantised; not switched to eval here, which a
            quantised graph refuses) taking one ``(B, 3, H, W)`` tensor.
        example: an input of the fixed shape the program takes.
        path: output file (parent folders are created).

    Returns:
        The written path.
    """
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(module, (example,))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        path.write_bytes(lowered.to_executorch().buffer)
    return path


def _write_settings(path: Path, settings: dict[str, Any]) -> None:
    Path(f"{path}.json").write_text(json.dumps(settings, indent=1) + "\n")


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings written beside a ``.pte`` (``path + ".json"``) by the export functions."""
    side = Path(f"{path}.json")
    if not side.exists():
        raise FileNotFoundError(f"{side} (the settings of {path}) does not exist; re-export")
    return json.loads(side.read_text())


def _inference_copy(model: nn.Module, fuse: bool) -> nn.Module:
    """The model to export: ExecuTorch checked, BatchNorms folded (a copy) or eval mode."""
    require_executorch()
    return fuse_conv_bn(model) if fuse else model.eval()


def _description(model: nn.Module) -> dict[str, Any]:
    description = getattr(model, "description", {}) or {}
    return {k: description.get(k) for k in ("class_names", "label_map") if k in description}


def export_ssdlite_pte(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int] | None = None,
    batch: int = 1,
    fuse: bool = True,
    int8: bool = False,
    calibration: Iterable | None = None,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    topk_candidates: int | None = None,
    detections_per_img: int | None = None,
) -> Path:
    """Write an SSDLite ``.pte`` (images -> per-class candidates) and its settings JSON.

    Args:
        model: an :class:`mnv3det.models.ssdlite.SSDLite` (left unchanged).
        path: output ``.pte``.
        input_size: ``(H, W)`` of the images the program takes (default: the model size; other
            sizes are resized to it inside, and the app scales boxes by ``box_scale``).
        batch: images per call.
        fuse: fold BatchNorms into the convolutions first.
        int8: quantise the network (PT2E, XNNPACK), calibrated on ``calibration``.
        calibration: ``(3, h, w)`` images in ``[0, 1]`` (e.g.
            :func:`mnv3det.deploy.int8.calibration_images`); needed with ``int8``.
        score_thresh: override of the model's minimum score (in the program).
        nms_thresh: override of the model's NMS IoU (in the settings, for
            :func:`select_detections`).
        topk_candidates: override of the candidates per class (in the program).
        detections_per_img: override of the detections per image (settings).

    Returns:
        The written path.

    Raises:
        ExportError: ExecuTorch is not installed.
        ValueError: ``int8`` without calibration images.
    """
    model = _inference_copy(model, fuse)
    h, w = input_size or model.size
    example = torch.rand(batch, 3, h, w)
    candidates = SSDLiteCandidates(model, None, score_thresh, topk_candidates)
    if int8:
        if calibration is None:
            raise ValueError("export_ssdlite_pte: int8=True needs calibration images")
        network = _calibrate_quantise(candidates.network, example, calibration)
        candidates = SSDLiteCandidates(model, network, score_thresh, topk_candidates)
    path = export_pte(candidates, example, path)
    nh, nw = model.size
    _write_settings(
        path,
        {
            "model": "ssdlite",
            "int8": int8,
            "input": "images (B, 3, H, W) float32 RGB in [0, 1]",
            "batch": batch,
            "input_size": [h, w],
            "network_size": [nh, nw],
            "box_scale": [w / nw, h / nh, w / nw, h / nh],
            "outputs": list(SSDLITE_PTE_OUTPUTS),
            "num_classes": model.num_classes,
            "score_thresh": candidates.score_thresh,
            "topk_candidates": candidates.topk_candidates,
            "nms_thresh": model.nms_thresh if nms_thresh is None else nms_thresh,
            "detections_per_img": detections_per_img or model.detections_per_img,
            **_description(model),
        },
    )
    return path


def export_lraspp_pte(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int] = (512, 1024),
    batch: int = 1,
    fuse: bool = True,
    int8: bool = False,
    calibration: Iterable | None = None,
) -> Path:
    """Write an LR-ASPP ``.pte`` (images in ``[0, 1]`` -> logits) and its settings JSON.

    Args:
        model: the segmentation model (ours, or torchvision's; left unchanged).
        path: output ``.pte``.
        input_size: the fixed ``(H, W)`` of the program's images and logits.
        batch: images per call.
        fuse: fold BatchNorms into the convolutions first.
        int8: quantise (PT2E, XNNPACK), calibrated on ``calibration``.
        calibration: ``(3, h, w)`` images in ``[0, 1]``; needed with ``int8``.

    Returns:
        The written path.

    Raises:
        ExportError: ExecuTorch is not installed.
        ValueError: ``int8`` without calibration images.
    """
    model = _inference_copy(model, fuse)
    deploy = SegmenterDeploy(model).eval()
    example = torch.rand(batch, 3, *input_size)
    module: nn.Module = deploy
    if int8:
        if calibration is None:
            raise ValueError("export_lraspp_pte: int8=True needs calibration images")
        module = _calibrate_quantise(deploy, example, calibration)
    path = export_pte(module, example, path)
    _write_settings(
        path,
        {
            "model": "lraspp",
            "int8": int8,
            "input": "images (B, 3, H, W) float32 RGB in [0, 1]",
            "batch": batch,
            "input_size": list(input_size),
            "outputs": ["logits"],
            "num_classes": getattr(model, "num_classes", None),
            **_description(model),
        },
    )
    return path


def check_pte(model: nn.Module, path: str | Path, seed: int = 0) -> str:
    """Run ``path`` in ExecuTorch's runtime and the PyTorch ``model`` on the same random images.

    Returns:
        One line: detections per image of both (SSDLite) or the max |logits difference|.
    """
    settings = read_settings(path)
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(settings["batch"], 3, *settings["input_size"], generator=gen)
    with torch.no_grad():
        if settings["model"] == "ssdlite":
            ref = [len(r["scores"]) for r in model.eval()(images)]
            out = [len(r["scores"]) for r in ExecuTorchDetector(path)(images)]
            return f"check {path}: ExecuTorch detections per image {out}, PyTorch {ref}"
        ref = SegmenterDeploy(model.eval())(images)
        diff = float((ExecuTorchSegmenter(path)(images) - ref).abs().max())
    return f"check {path}: max |logits difference| = {diff:.2e}"


# ----------------------------------------------------------------------------- running
def set_threads(threads: int) -> None:
    """Size ExecuTorch's (XNNPACK's) thread pool; the default is one thread per core."""
    require_executorch()
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(threads)


def load_method(path: str | Path, name: str = "forward") -> Any:
    """A program's method in ExecuTorch's Python runtime: ``method.execute([images])``."""
    require_executorch()
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(path))
    return program.load_method(name)


class _ExecuTorchModel(nn.Module):
    """A ``.pte`` in ExecuTorch's runtime, called like the PyTorch model it came from."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.settings = read_settings(path)
        if threads is not None:
            set_threads(threads)
        self.method = load_method(path)
        self.input_size = tuple(self.settings["input_size"])
        self.batch = int(self.settings.get("batch", 1))

    def run(self, images: Tensor) -> list[Tensor]:
        """The program's outputs for ``(B, 3, H, W)`` images of the export size and batch."""
        return list(self.method.execute([images.detach().float().cpu().contiguous()]))

    def _resized(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) == self.input_size:
            return images
        return F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False)

    def _batches(self, images: Tensor) -> list[tuple[Tensor, int]]:
        """``images`` cut into the program's batch size (the last one padded), with counts."""
        chunks = []
        for start in range(0, len(images), self.batch):
            chunk = images[start : start + self.batch]
            count = len(chunk)
            if count < self.batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.batch - count, -1, -1, -1)])
            chunks.append((chunk, count))
        return chunks


class ExecuTorchDetector(_ExecuTorchModel):
    """An SSDLite ``.pte`` with :class:`~mnv3det.models.ssdlite.SSDLite`'s eval interface:
    ``model(images)`` -> per image ``{"boxes", "scores", "labels"}`` in that image's pixels.

    Images of another size than the program's are resized to it first (one bilinear resize,
    as the eager model does when the program's input size is the network size). The program's
    candidates go through :func:`select_detections` with the settings' thresholds.

    Args:
        path: the ``.pte`` of :func:`export_ssdlite_pte` (fp32 or int8).
        threads: ExecuTorch thread-pool size (``None``: leave it).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__(path, threads)
        self.size = tuple(self.settings["network_size"])
        self.num_classes = int(self.settings["num_classes"])

    def detect(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Dense detections ``(boxes, scores, labels, num_detections)`` of ``(N, 3, H, W)``."""
        h, w = images.shape[-2:]
        nh, nw = self.size
        scale = torch.tensor([w / nw, h / nh, w / nw, h / nh], dtype=torch.float32)
        s = self.settings
        outputs = []
        for chunk, count in self._batches(self._resized(images.float().cpu())):
            boxes, scores = self.run(chunk)
            dense = select_detections(
                boxes[:count],
                scores[:count],
                s["nms_thresh"],
                s["score_thresh"],
                s["detections_per_img"],
                scale,
            )
            outputs.append(dense)
        return tuple(torch.cat(parts) for parts in zip(*outputs))  # type: ignore[return-value]

    def forward(self, images: Tensor | Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of ``(N, 3, H, W)`` or a list of ``(3, H, W)`` images (any sizes)."""
        if isinstance(images, Tensor):
            return dense_to_list(*self.detect(images))
        out = []
        for image in images:
            (det,) = dense_to_list(*self.detect(image[None]))
            out.append({k: v.to(image.device) for k, v in det.items()})
        return out


class ExecuTorchSegmenter(_ExecuTorchModel):
    """An LR-ASPP ``.pte`` called like the model: ``model(images in [0, 1])`` -> logits.

    Images of another size than the program's are resized to it and the logits resized back
    (bilinear), so validation on any size works; at the export size nothing is resized.

    Args:
        path: the ``.pte`` of :func:`export_lraspp_pte` (fp32 or int8).
        threads: ExecuTorch thread-pool size (``None``: leave it).
    """

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, C, H, W)`` on ``images``' device."""
        size = tuple(images.shape[-2:])
        logits = torch.cat(
            [
                self.run(chunk)[0][:count]
                for chunk, count in self._batches(self._resized(images.float().cpu()))
            ]
        )
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.to(images.device)
