"""The Lite Reduced Atrous Spatial Pyramid Pooling (LR-ASPP) segmentation head (paper §6.4, Fig. 10).

Howard et al., "Searching for MobileNetV3", ICCV 2019, §6.4: the head takes a low-level feature
map at stride 8 and a high-level one at stride 16 (last stage dilated) or 32 and computes

* high branch: ``1x1 conv (inter_channels=128) -> BN -> ReLU``, multiplied by a gate
  ``avg pool -> 1x1 conv (128) -> sigmoid`` (a squeeze-and-excitation-like attention),
* the gated map is upsampled bilinearly to the low map's size and classified by a 1x1 conv,
* a second 1x1 classifier on the low map; the two class maps are summed.

The caller upsamples the logits to the input size. This module knows nothing of MobileNetV3: it
takes the two channel counts and a ``{"low": ..., "high": ...}`` mapping of feature maps.

Module names follow torchvision's ``LRASPPHead`` (``cbr.{0,1}``, ``scale.1``, ``low_classifier``,
``high_classifier``) so torchvision's ``classifier.*`` checkpoint keys load one-to-one; the
BatchNorm has torchvision's defaults (eps 1e-5, momentum 0.1).

Two gates (``pooling``):

``"global"``
    Global average pooling (torchvision, PaddleSeg). One gate value per channel; works for any
    input size and is what torchvision's published weights were trained with.

``"paper"``
    The paper's large-kernel pooling: a 49x49 average-pooling window with stride (16, 20) over
    the high feature map, as used for Cityscapes training on 1024x2048 images at output stride
    16 (a 64x128 map, so a 1x4 grid of gate vectors, each pooled over 49x49 cells = 784x784
    pixels). The gate grid is upsampled back to the feature size bilinearly (as the paper's
    Fig. 10 draws it and the TF DeepLab implementation does) and multiplies the 128-channel map:
    a spatially varying, *local* attention instead of a single global one.

    **Small inputs.** The kernel and stride are in feature-map cells, fixed by the training
    resolution. mmsegmentation applies the fixed 49x49 kernel with ``AvgPool2d`` and crashes
    ("output size is too small") whenever the map is smaller than 49 cells (e.g. 512x1024 crops
    at output stride 32, or any small demo image). What the paper means by a window "of 49x49"
    is "average over (up to) a 784-pixel neighbourhood": when the map is smaller than the window
    along a dimension, the window covers the whole map along it. So the kernel is clamped per
    dimension to the map size (``min(49, H)``, ``min(49, W)``); along a dimension that is
    clamped there is exactly one window, and when both are clamped the gate is global average
    pooling, i.e. the paper's head degrades gracefully into torchvision's. Larger maps get the
    sliding local windows. Nothing is padded (padding with zeros would darken border windows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

POOLING_MODES = ("global", "paper")
PAPER_POOL_KERNEL: tuple[int, int] = (49, 49)
"""Paper's gate pooling window in feature-map cells (1024x2048 training size, output stride 16)."""
PAPER_POOL_STRIDE: tuple[int, int] = (16, 20)
"""Paper's gate pooling stride in feature-map cells."""


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"LRASPPHead: {name} must be a positive int or (h, w) pair, got {value!r}")
    return int(pair[0]), int(pair[1])


class LargeKernelAvgPool(nn.Module):
    """Average pooling with a kernel clamped to the input size (the paper's LR-ASPP gate pool).

    For an ``H x W`` map the window is ``(min(kh, H), min(kw, W))`` with stride ``(sh, sw)``, no
    padding. A map no larger than the kernel gets global average pooling (one window), which is
    what the paper's fixed 49x49 window means on inputs smaller than its 1024x2048 training
    size; mmsegmentation's unclamped ``AvgPool2d(49, (16, 20))`` crashes there instead.

    Args:
        kernel_size: nominal window ``(kh, kw)`` in feature-map cells.
        stride: window stride ``(sh, sw)`` in feature-map cells.
    """

    def __init__(
        self,
        kernel_size: int | Sequence[int] = PAPER_POOL_KERNEL,
        stride: int | Sequence[int] = PAPER_POOL_STRIDE,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "pool_kernel")
        self.stride = _pair(stride, "pool_stride")

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        kernel = (min(self.kernel_size[0], int(h)), min(self.kernel_size[1], int(w)))
        return F.avg_pool2d(x, kernel, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, clamped to the input size"


class LRASPPHead(nn.Module):
    """LR-ASPP head: gated 128-channel high branch + low-level classifier, summed (paper Fig. 10).

    Args:
        low_channels: channels of the stride-8 feature map.
        high_channels: channels of the stride-16 (dilated) or stride-32 feature map.
        num_classes: number of output classes.
        inter_channels: width of the gated branch (128 in the paper and torchvision).
        pooling: ``"global"`` (torchvision) or ``"paper"`` (49x49 window, stride (16, 20),
            clamped to the map size; see the module docstring).
        pool_kernel: window of the paper gate in feature cells (only for ``pooling="paper"``).
        pool_stride: stride of the paper gate in feature cells (only for ``pooling="paper"``).

    Raises:
        ValueError: a non-positive channel count or an unknown ``pooling``.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        inter_channels: int = 128,
        pooling: str = "global",
        pool_kernel: int | Sequence[int] = PAPER_POOL_KERNEL,
        pool_stride: int | Sequence[int] = PAPER_POOL_STRIDE,
    ) -> None:
        super().__init__()
        for name, value in (
            ("low_channels", low_channels),
            ("high_channels", high_channels),
            ("num_classes", num_classes),
            ("inter_channels", inter_channels),
        ):
            if int(value) < 1:
                raise ValueError(f"LRASPPHead: {name} must be >= 1, got {value}")
        if pooling not in POOLING_MODES:
            raise ValueError(f"LRASPPHead: pooling must be one of {POOLING_MODES}, got {pooling!r}")
        self.pooling = pooling
        self.num_classes = num_classes
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
        )
        pool: nn.Module = (
            nn.AdaptiveAvgPool2d(1)
            if pooling == "global"
            else LargeKernelAvgPool(pool_kernel, pool_stride)
        )
        # Index 1 holds the only parameter, as in torchvision (checkpoint key ``scale.1.weight``).
        self.scale = nn.Sequential(
            pool,
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def gate(self, high: Tensor) -> Tensor:
        """The attention gate at the high map's resolution (``(N, inter, 1, 1)`` when global)."""
        s = self.scale(high)
        if s.shape[-2:] != (1, 1) and s.shape[-2:] != high.shape[-2:]:
            # Paper mode with several windows: spread the gate grid back over the feature map.
            s = F.interpolate(s, size=high.shape[-2:], mode="bilinear", align_corners=False)
        return s

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Class logits at the low map's resolution (stride 8).

        Args:
            features: ``{"low": (N, low_channels, H/8, W/8), "high": (N, high_channels, h, w)}``.

        Returns:
            ``(N, num_classes, H/8, W/8)`` logits.
        """
        low, high = features["low"], features["high"]
        x = self.cbr(high) * self.gate(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


__all__ = [
    "PAPER_POOL_KERNEL",
    "PAPER_POOL_STRIDE",
    "POOLING_MODES",
    "LRASPPHead",
    "LargeKernelAvgPool",
]
