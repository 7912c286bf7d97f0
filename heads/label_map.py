"""Label maps from low-resolution logits without upsampling every class map.

A segmentation head (LR-ASPP: stride 8) predicts ``(N, C, h, w)`` logits; the label map is
``argmax_c bilinear_upsample(logits)[c]`` at the image size. Upsampling all ``C`` maps to
1024x2048 and reducing over the strided class dimension writes and reads ``C`` full-size float
maps (the slowest part of LR-ASPP inference on a CPU). Bilinear interpolation blends the same
four low-resolution neighbours for every class with the same weights, so:

* where the four neighbours of an output pixel have the same argmax ``c`` (each with a margin,
  i.e. ``c`` beats every other class at all four), ``c`` wins every convex blend of them: the
  pixel's label is that of its cell, copied with two ``index_select`` calls;
* only the pixels of *mixed* cells (class boundaries) blend their four neighbours' logit
  vectors, with the weights and source indices of ``F.interpolate(mode="bilinear",
  align_corners=False)``.

Labels equal upsample-then-argmax except where two classes tie to within float rounding
(measured in docs/deployment.md). When most cells are mixed (noisy, e.g. untrained, logits),
the whole map is upsampled in channels_last layout and reduced over its contiguous last
dimension instead (bitwise the same values as the NCHW upsample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MIXED_CELL_FALLBACK", "bilinear_argmax"]

#: Above this fraction of mixed cells, upsample everything (channels_last) and reduce instead.
MIXED_CELL_FALLBACK = 0.3


def _source_index(out_size: int, in_size: int, device: torch.device) -> tuple[Tensor, ...]:
    """``(i0, i1, lambda0, lambda1)`` per output position, as PyTorch's bilinear CPU kernel
    (``area_pixel_compute_source_index``, align_corners=False, scale = in / out)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(
        min=0
    )
    i0 = src.to(torch.long)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    lam1 = src - i0.to(torch.float32)
    return i0, i1, 1.0 - lam1, lam1


def bilinear_argmax(logits: Tensor, size: tuple[int, int], margin: float = 1e-4) -> Tensor:
    """``F.interpolate(logits, size, mode="bilinear").argmax(1)`` without the full upsample.

    Args:
        logits: ``(N, C, h, w)`` float logits (any memory format).
        size: output ``(H, W)``.
        margin: a cell counts as pure only if its class beats the runner-up by more than this at
            each of its four corners (guards against float rounding of the blend).

    Returns:
        ``(N, H, W)`` int64 labels.
    """
    n, c, h, w = logits.shape
    big_h, big_w = size
    logits = logits.float()
    top2 = logits.topk(2, dim=1) if c > 1 else None
    labels_low = logits.argmax(1)  # (N, h, w)
    if top2 is None:
        return labels_low.new_zeros((n, big_h, big_w))
    sure = (top2.values[:, 0] - top2.values[:, 1]) > margin
    lab = torch.where(sure, labels_low, -1)
    # a cell (y, x) blends corners (y, x), (y+1, x), (y, x+1), (y+1, x+1) (clamped at borders)
    down = torch.cat((lab[:, 1:], lab[:, -1:]), 1)
    right = torch.cat((lab[:, :, 1:], lab[:, :, -1:]), 2)
    diag = torch.cat((down[:, :, 1:], down[:, :, -1:]), 2)
    pure = (lab >= 0) & (lab == down) & (lab == right) & (lab == diag)
    y0, y1, wy0, wy1 = _source_index(big_h, h, logits.device)
    x0, x1, wx0, wx1 = _source_index(big_w, w, logits.device)
    if 1.0 - pure.float().mean().item() > MIXED_CELL_FALLBACK:
        cl = logits.contiguous(memory_format=torch.channels_last)
        up = F.interpolate(cl, size=size, mode="bilinear", align_corners=False)
        return up.permute(0, 2, 3, 1).argmax(-1)
    cell = torch.where(pure, labels_low, -1)
    labels = cell.index_select(1, y0).index_select(2, x0)  # (N, H, W), -1 = mixed cell
    mixed = (labels < 0).nonzero()
    if mixed.numel():
        b, py, px = mixed.unbind(1)
        table = logits.permute(0, 2, 3, 1).reshape(-1, c)  # (N*h*w, C) rows of corner vectors
        base = b * (h * w)
        r0, r1 = base + y0[py] * w, base + y1[py] * w
        c0, c1 = x0[px], x1[px]
        a0, a1 = wy0[py, None], wy1[py, None]
        b0, b1 = wx0[px, None], wx1[px, None]
        value = a0 * (b0 * table[r0 + c0] + b1 * table[r0 + c1]) + a1 * (
            b0 * table[r1 + c0] + b1 * table[r1 + c1]
        )
        labels[b, py, px] = value.argmax(1)
    return labels
