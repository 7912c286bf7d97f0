"""Training speed options shared by :class:`~mnv3det.tasks.detection.DetectionTask` and
:class:`~mnv3det.tasks.segmentation.SegmentationTask`.

What the profile of a MobileNetV3 training step on a CPU says (SSDLite320-Large, batch 8; see
``tools/train_step_benchmark.py`` and the README's "Training speed"):

* **channels_last** (NHWC) lets oneDNN run the depthwise convolutions and BatchNorm without
  layout conversions: the depthwise backward is 3-4x faster than in NCHW. The tasks switch
  their model to it for the duration of ``fit`` (:func:`set_memory_format`) and back at its
  end, so that a model after ``fit`` computes exactly as one rebuilt from its checkpoint.
* **bf16 autocast** runs the 1x1 (pointwise) convolutions, most of the FLOPs, 3-5x faster on a
  CPU with native bf16 (AVX512-BF16 or AMX). The *depthwise* convolutions are the exception:
  oneDNN's bf16 depthwise backward (strided ones above all) is up to 10x slower than its fp32
  channels_last one, so under CPU autocast they run in fp32
  (:func:`keep_depthwise_in_float32`).
* a **fused** SGD step (one kernel over all parameters) instead of a Python loop.

:func:`resolve_train_autocast` decides whether a training step runs under bf16 autocast when
the trainer itself does not autocast (``trainer.precision: 32-true``); validation, test and
predict always run as the trainer says (fp32 by default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "AUTOCAST_MODES",
    "Float32DepthwiseConv2d",
    "compile_modules",
    "cpu_has_native_bf16",
    "keep_depthwise_in_float32",
    "prepare_for_training",
    "resolve_train_autocast",
    "set_memory_format",
    "step_autocast",
    "train_autocast",
]

#: Values of the tasks' ``train_autocast`` argument.
AUTOCAST_MODES = ("auto", "bf16", "off")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast
    makes convolutions faster; on other CPUs oneDNN emulates bf16 and it is slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_train_autocast(mode: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the training step, or ``None`` for none.

    Args:
        mode: ``"auto"`` (bf16 on a CPU with native bf16, nothing elsewhere: on a GPU the
            trainer's ``precision`` decides), ``"bf16"`` (bf16 autocast on any device) or
            ``"off"``.
        device: where the model is.

    Raises:
        ValueError: ``mode`` is not one of :data:`AUTOCAST_MODES`.
    """
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"train_autocast must be one of {AUTOCAST_MODES}, got {mode!r}")
    device_type = torch.device(device).type
    if mode == "bf16" or (mode == "auto" and device_type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def train_autocast(dtype: torch.dtype | None, device: torch.device | str) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` unless ``dtype`` is ``None`` or autocast is already
    on there (``trainer.precision: bf16-mixed`` / ``16-mixed``: the trainer's choice wins)."""
    device_type = torch.device(device).type
    if dtype is None or torch.is_autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type, dtype=dtype):
        yield


class Float32DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` that runs in fp32 under CPU autocast (same parameters, same
    ``state_dict``; outside CPU autocast it is ``nn.Conv2d``). See the module docstring."""

    def forward(self, input: Tensor) -> Tensor:
        """``nn.Conv2d.forward``, in fp32 when CPU autocast is on."""
        if input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(input.float())
        return super().forward(input)


def keep_depthwise_in_float32(model: nn.Module, also: Iterable[nn.Module] = ()) -> int:
    """Make every depthwise ``nn.Conv2d`` of ``model``, and every ``nn.Conv2d`` inside the
    modules of ``also`` (e.g. SSDLite's prediction heads, whose outputs are the box offsets and
    class logits), a :class:`Float32DepthwiseConv2d`: fp32 under CPU autocast.

    Only the class changes (parameters, buffers, hooks and ``state_dict`` keys stay), so
    checkpoints, EMA copies and exports are unaffected; nothing changes outside CPU autocast.

    Returns:
        How many convolutions were changed.
    """
    chosen = {id(m) for extra in also for m in extra.modules()}
    changed = 0
    for module in model.modules():
        if type(module) is not nn.Conv2d:
            continue
        depthwise = module.groups > 1 and module.groups == module.in_channels
        if depthwise or id(module) in chosen:
            module.__class__ = Float32DepthwiseConv2d
            changed += 1
    return changed


def set_memory_format(modules: Iterable[nn.Module | None], channels_last: bool) -> None:
    """Put the 4-d parameters and buffers of ``modules`` in channels_last (NHWC) or back in the
    contiguous (NCHW) memory format, in place (the ``Parameter`` objects stay, so an optimiser
    built before keeps them). Convolutions produce NHWC outputs from NCHW inputs when their
    weights are NHWC, so inputs need no change. ``None`` entries are skipped (no EMA)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in modules:
        if module is not None:
            module.to(memory_format=memory_format)


def compile_modules(modules: list[nn.Module]) -> None:
    """``torch.compile`` each module in place (``nn.Module.compile``: the ``state_dict`` keys do
    not change, so checkpoints stay loadable by the uncompiled model)."""
    for module in modules:
        module.compile()


def prepare_for_training(
    model: nn.Module, owner: str, train_autocast: str, float32: Iterable[nn.Module] = ()
) -> None:
    """What a task does to its freshly built model: check ``train_autocast`` and keep the
    depthwise convolutions, and every convolution in ``float32``, fp32 under CPU autocast
    (:func:`keep_depthwise_in_float32`).

    Args:
        model: the task's model (before any EMA copy, so that the copy is alike).
        owner: the task's name, for the error message.
        train_autocast: the task's argument, one of :data:`AUTOCAST_MODES`.
        float32: submodules whose convolutions all stay fp32 under CPU autocast.

    Raises:
        ValueError: ``train_autocast`` is not one of :data:`AUTOCAST_MODES`.
    """
    if train_autocast not in AUTOCAST_MODES:
        raise ValueError(
            f"{owner}: train_autocast must be one of {AUTOCAST_MODES}, got {train_autocast!r}"
        )
    keep_depthwise_in_float32(model, float32)


def step_autocast(mode: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of one training step: :func:`train_autocast` of
    :func:`resolve_train_autocast`."""
    return train_autocast(resolve_train_autocast(mode, device), device)
