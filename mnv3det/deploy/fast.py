"""Fast PyTorch inference: conv+BatchNorm folding and channels_last (deployment, paper §7).

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

import torch
from torch import nn
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
            channels_last inputs too. ``tools/benchmark.py`` measures whether it helps on a
            given CPU (for depthwise-heavy MobileNetV3 it often does not).
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
