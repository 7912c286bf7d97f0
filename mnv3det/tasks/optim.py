"""Optimiser and schedule helpers shared by the detection and segmentation tasks.

* Weight decay only on conv/linear weights: not on norm layers or biases (torchvision's
  reference scripts ``--norm-weight-decay 0``, and the SSD/MobileNet recipes).
* Learning-rate multipliers per step: linear warm-up then cosine (torchvision's SSDLite recipe)
  or polynomial decay (DeepLab/LR-ASPP recipe, power 0.9).
* Optional EMA of weights via ``torch.optim.swa_utils.AveragedModel``.
* The SGD step is fused (one kernel over every parameter, ``torch.optim.SGD(fused=True)``)
  where PyTorch has the fused kernel (CPU, CUDA), instead of a Python loop over parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

#: Device types on which ``torch.optim.SGD(fused=True)`` has a kernel.
_FUSED_SGD_DEVICES = ("cpu", "cuda")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (conv/linear weights) and an undecayed one.

    Args:
        model: the model to optimise; frozen parameters (``requires_grad=False``) are skipped.
        weight_decay: decay for conv/linear weights; norm weights and all biases get 0.
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, norm_types) or name.endswith("bias"):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, warmup_factor: float = 1e-3
) -> float:
    """Multiplier of the base lr: linear warm-up from ``warmup_factor`` then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor * (1 - alpha) + alpha
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_poly(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    power: float = 0.9,
    warmup_factor: float = 1e-3,
) -> float:
    """Multiplier of the base lr: optional linear warm-up then ``(1 - t/T) ** power``."""
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor * (1 - alpha) + alpha
    progress = min(1.0, step / max(1, total_steps))
    return (1 - progress) ** power


def sgd_with_schedule(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    fused: bool | None = None,
) -> dict:
    """SGD (Nesterov off, as in the recipes) plus a per-step LambdaLR, in Lightning's format.

    Args:
        model: model whose trainable parameters are optimised.
        lr: base learning rate.
        momentum: SGD momentum.
        weight_decay: decay for conv/linear weights only.
        total_steps: optimiser steps of the whole run (``trainer.estimated_stepping_batches``).
        warmup_steps: linear warm-up steps.
        schedule: "cosine" or "poly".
        fused: use PyTorch's fused SGD kernel; ``None`` (default): when every trainable
            parameter is a float tensor on a device that has it (:func:`can_fuse_sgd`).

    Returns:
        The dict ``configure_optimizers`` returns.
    """
    if schedule not in ("cosine", "poly"):
        raise ValueError(f"schedule must be 'cosine' or 'poly', got {schedule!r}")
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = can_fuse_sgd(p for group in groups for p in group["params"])
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused or None)
    if schedule == "cosine":

        def factor(step: int) -> float:
            return warmup_cosine(step, total_steps, warmup_steps)
    else:

        def factor(step: int) -> float:
            return warmup_poly(step, total_steps, warmup_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }


def can_fuse_sgd(params: Iterable[Tensor]) -> bool:
    """Whether ``torch.optim.SGD(fused=True)`` takes these parameters: floating point, all on
    one device of a type with the fused kernel (CPU or CUDA), at least one."""
    params = list(params)
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in _FUSED_SGD_DEVICES
        and all(p.is_floating_point() for p in params)
    )


def make_ema(model: nn.Module, decay: float = 0.9998) -> torch.optim.swa_utils.AveragedModel:
    """Exponential moving average of weights and buffers (BN statistics included)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def set_bn_momentum(model: nn.Module, momentum: float | None, owner: str) -> None:
    """Set the momentum of every BatchNorm in ``model`` (``None``: leave them as built).

    Args:
        model: the task's model.
        momentum: BatchNorm running-statistics momentum, in (0, 1].
        owner: name used in the error message (e.g. ``"DetectionTask"``).
    """
    if momentum is None:
        return
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"{owner}: bn_momentum must be in (0, 1], got {momentum}")
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
