"""Fast PyTorch inference: conv+BatchNorm folding and channels_last (deployment, paper §7).

:func:`optimize_for_inference` speeds up any model; :class:`FastSSDLite` is SSDLite's fast path
(the fused model's own pre-processing, layers and dense post-processing, channels_last input).

MobileNetV3 has a BatchNorm after every convolution; in eval mode each one is an affine map
that can be folded into the convolution's weights and bias (``torch.nn.utils.fusion``), which
removes a third of the layers a forward pass walks through. The activations stay separate
modules (h-swish/ReLU are cheap elementwise ops). Works on any model built from
``Sequential(conv, bn, ...)`` pairs: the backbone, SSDLite's and LR-ASPP's heads, torchvision's
own MobileNetV3 models.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fuse_conv_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every ``Conv2d`` directly followed by ``BatchNorm2d`` in a Sequential.

    Args:
        model: any module; it is put in eval mode (folding is only valid there).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The fused model (BatchNorms replaced by ``nn.Identity``), in eval mode.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            conv, bn = module._modules[first], module._modules[second]
            if (
                type(conv) is nn.Conv2d
                and type(bn) is nn.BatchNorm2d
                and bn.track_running_stats
                and conv.out_channels == bn.num_features
            ):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return model


def count_batch_norms(model: nn.Module) -> int:
    """Number of BatchNorm layers left in ``model`` (0 after a full fusion)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def optimize_for_inference(
    model: nn.Module, channels_last: bool = False, inplace: bool = False
) -> nn.Module:
    """Eval mode, conv+BN folding and optionally channels_last memory format.

    Args:
        model: the model to speed up; outputs stay equal up to float rounding (tests check
            detections identical and logits within 1e-4).
        channels_last: convert weights to ``torch.channels_last``; callers should feed
            channels_last inputs too. ``mnv3det benchmark`` measures whether it helps on a
            given CPU (on the AVX512 machine of docs/deployment.md it does).
        inplace: modify ``model`` itself.

    Returns:
        The optimised model with gradients disabled.
    """
    model = fuse_conv_bn(model, inplace=inplace)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def compile_frozen(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)`` for inference with Inductor's *freezing* (weights folded in as
    constants, oneDNN convolution fusions and weight pre-packing).

    Freezing is an Inductor config flag read while compiling, which happens at the first call;
    ``torch.compile(options={"freezing": True})`` did not switch it on here (measured: no gain),
    so each call runs under ``torch._inductor.config.patch(freezing=True)`` (a cheap attribute
    swap after the first call). Call the result under ``torch.no_grad()`` /
    ``torch.inference_mode()``: freezing applies to inference graphs only.
    """
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fn, dynamic=False)

    def run(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return run


class FastSSDLite(nn.Module):
    """Fast PyTorch inference for SSDLite with torchvision's output format.

    A fused copy of the model (:func:`optimize_for_inference`, optionally channels_last) run
    through its own :meth:`~mnv3det.models.ssdlite.SSDLite.preprocess` (one normalise + resize
    for a batch of same-size images), :meth:`~mnv3det.models.ssdlite.SSDLite.head_outputs` and
    dense :meth:`~mnv3det.models.ssdlite.SSDLite.postprocess` (no loop over images or classes).
    Detections equal the original model's.

    Args:
        model: an :class:`mnv3det.models.ssdlite.SSDLite` (left unchanged).
        channels_last: run the network in channels_last memory format.
        bf16: run the network under ``torch.autocast("cpu", torch.bfloat16)`` (fast on CPUs
            with AVX512-BF16 / AMX; post-processing stays float32). Detections then differ
            slightly from float32 (accuracy cost in docs/deployment.md).
        compile: compile the network with ``torch.compile`` (Inductor, ``freezing``: weights
            folded in as constants, oneDNN convolution fusions). The first call per batch size
            compiles (about 7 s on 2 cores; needs a C++ compiler); then the network takes ~25 %
            less time on the benchmark CPU. Outputs equal the eager network's up to float
            rounding. The post-processing is not compiled (data-dependent NMS).
        **thresholds: ``score_thresh``, ``nms_thresh``, ``topk_candidates``,
            ``detections_per_img`` overrides (``None`` keeps the model's).
    """

    def __init__(
        self,
        model: nn.Module,
        channels_last: bool = False,
        bf16: bool = False,
        compile: bool = False,
        **thresholds: float | int | None,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.bf16 = bf16
        self.model = optimize_for_inference(model, channels_last=channels_last)
        self._head_outputs = self.model.head_outputs
        if compile:
            self._head_outputs = compile_frozen(self.model.head_outputs)
        for name, value in thresholds.items():
            if not hasattr(self.model, name):
                raise TypeError(f"FastSSDLite: unknown threshold {name!r}")
            if value is not None:
                setattr(self.model, name, value)

    def preprocess(self, images: Tensor | list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """``(batch at the model size, original (h, w) per image)``."""
        batch, original, _ = self.model.preprocess(images)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, original

    def network(self, batch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Backbone, extra blocks and heads on a pre-processed batch: ``(outputs, anchors)``."""
        if not self.bf16:
            return self._head_outputs(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs, anchors = self._head_outputs(batch)
        return {k: v.float() for k, v in outputs.items()}, anchors.float()

    def postprocess(
        self, outputs: dict[str, Tensor], anchors: Tensor, original: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per-image ``{"boxes", "scores", "labels"}`` (torchvision's format)."""
        return self.model.postprocess(outputs, anchors, original)

    @torch.no_grad()
    def forward(self, images: Tensor | list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections for ``(N, 3, H, W)`` or a list of ``(3, H, W)`` images in ``[0, 1]``."""
        batch, original = self.preprocess(images)
        return self.postprocess(*self.network(batch), original)
