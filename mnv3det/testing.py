"""Random but realistic parameters for parity tests and benchmarks.

Freshly initialised BatchNorm layers have identity statistics (mean 0, var 1, weight 1, bias 0),
which hides eps mistakes and wrong key mappings in parity checks; untrained detectors also give
unrealistically few candidates to post-processing. These helpers fix both, deterministically.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (in place).

    Args:
        model: any module.
        seed: generator seed (same seed, same values).

    Returns:
        ``model``.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Unit-gain random conv weights, small random conv biases and random BatchNorm (in place).

    Keeps activations at a sensible scale through a deep network, so a detector's scores
    spread out like a trained one's (a worst case for post-processing).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.weight[0].numel() ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return randomize_bn_stats(model, seed)
