"""LR-ASPP segmentation model: the MobileNetV3 backbone with the LR-ASPP head (paper §6.4).

``lraspp("large", num_classes=19)`` builds the paper's Cityscapes model: MobileNetV3-Large with
the reduced tail (RF2, 480-channel last conv) and the last stage dilated (output stride 16),
the low-level branch tapped at stride 8 and the high-level branch at the last conv, and the
LR-ASPP head of :mod:`heads.lraspp`. ``model(images)`` returns logits ``(N, C, H, W)`` at the
input resolution (bilinear, ``align_corners=False``, like torchvision). Inputs are normalised
with the ImageNet mean/std by the caller (the Lightning task does it), as for torchvision's
model.

Low-level tap. The paper (Fig. 10) draws the low branch from the "1/8 resolution" features.
This module offers both readings:

* ``"stage3"`` (default): the *last* block output at stride 8 (``features.6`` of Large, 40 ch),
  the complete stride-8 stage.
* ``"stage3_first"``: the output of the *first* stride-8 block (``features.4`` of Large, also
  40 ch). This is what torchvision's ``lraspp_mobilenet_v3_large`` taps (its builder takes the
  strided "C2" block itself), so torchvision checkpoints need it for identical logits.

With ``low_tap=None`` the choice is automatic: ``"stage3_first"`` when ``weights`` is a
torchvision LR-ASPP checkpoint (keys ``backbone.N...``/``classifier.*``), else ``"stage3"``.

Loading torchvision's checkpoint. torchvision builds ``lraspp_mobilenet_v3_large`` with
``dilated=True`` and the *full* tail (``reduced_tail=False``, 960-ch last conv) and 21 VOC
classes, so ``lraspp("large", num_classes=21, reduced_tail=False, weights="lraspp.pth")`` gives
the same logits; its backbone keys ``backbone.N.*`` map to our ``backbone.features.N.*`` and its
``classifier.*`` keys are ours unchanged.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from heads.lraspp import PAPER_POOL_KERNEL, PAPER_POOL_STRIDE, LRASPPHead
from mnv3det.backbone import MobileNetV3Backbone, block_configs, mobilenet_v3
from mnv3det.weights import LoadReport, load_matching, read_state_dict

LOW_TAPS = ("stage3", "stage3_first")
HIGH_TAP = "last_conv"
_TV_BACKBONE_KEY = re.compile(r"^backbone\.(\d+)\.")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


class WeightsFormatError(ValueError):
    """The checkpoint is neither a torchvision LR-ASPP nor an mnv3det LR-ASPP state_dict."""


def _stride8_block_indices(arch: str, width_mult: float) -> tuple[int, int]:
    """``features`` indices of the first and the last block whose output is at stride 8."""
    _, configs, _, _ = block_configs(arch, width_mult)
    stride, at_8 = 2, []
    for index, cfg in enumerate(configs, start=1):  # features[0] is the stem
        stride *= cfg.stride
        if stride == 8:
            at_8.append(index)
    return at_8[0], at_8[-1]


def _normalise_keys(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Strip wrapper prefixes and detect ``"torchvision"`` or ``"mnv3det"`` key layout."""
    state = dict(state)
    changed = True
    while changed:  # e.g. a Lightning checkpoint of a DDP/compiled model: "model.module.x"
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    if any(k.startswith("backbone.features.") for k in state):
        return state, "mnv3det"
    if any(_TV_BACKBONE_KEY.match(k) for k in state):
        renamed = {_TV_BACKBONE_KEY.sub(r"backbone.features.\1.", k): v for k, v in state.items()}
        return renamed, "torchvision"
    sample = ", ".join(list(state)[:5])
    raise WeightsFormatError(
        "lraspp weights: not an LR-ASPP checkpoint (expected torchvision's keys like "
        "'backbone.0.0.weight' and 'classifier.cbr.0.weight', or mnv3det's "
        f"'backbone.features.0.0.weight'); first keys are: {sample}. For an ImageNet "
        "MobileNetV3 checkpoint use weights_backbone= instead."
    )


class LRASPP(nn.Module):
    """MobileNetV3 + LR-ASPP head; ``forward(images) -> logits (N, num_classes, H, W)``.

    Build it with :func:`lraspp`. Attributes: ``backbone`` (a
    :class:`~mnv3det.backbone.MobileNetV3Backbone`), ``classifier`` (the
    :class:`~heads.lraspp.LRASPPHead`), ``low_tap``, ``num_classes``, ``output_stride``,
    ``weights_report`` (a :class:`~mnv3det.weights.LoadReport` when ``weights`` were given).
    """

    def __init__(
        self,
        backbone: MobileNetV3Backbone,
        num_classes: int,
        low_tap: str = "stage3",
        inter_channels: int = 128,
        pooling: str = "global",
        pool_kernel: int | Sequence[int] = PAPER_POOL_KERNEL,
        pool_stride: int | Sequence[int] = PAPER_POOL_STRIDE,
    ) -> None:
        super().__init__()
        if low_tap not in LOW_TAPS:
            raise ValueError(f"lraspp: low_tap must be one of {LOW_TAPS}, got {low_tap!r}")
        names = [f.name for f in backbone.feature_info]
        if names != ["stage3", HIGH_TAP]:
            raise ValueError(
                f"LRASPP needs a backbone with taps ['stage3', 'last_conv'], got {names}"
            )
        self.backbone = backbone
        self.low_tap = low_tap
        self.num_classes = num_classes
        low_info, high_info = backbone.feature_info
        self.output_stride = high_info.stride
        first, _ = _stride8_block_indices(backbone.arch, backbone.width_mult)
        self._low_index = first  # only used for low_tap="stage3_first"
        self.classifier = LRASPPHead(
            low_info.channels,
            high_info.channels,
            num_classes,
            inter_channels=inter_channels,
            pooling=pooling,
            pool_kernel=pool_kernel,
            pool_stride=pool_stride,
        )
        self.weights_report: LoadReport | None = None

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """The head's inputs ``{"low": stride-8 map, "high": last conv}``."""
        if self.low_tap == "stage3":
            taps = self.backbone(images)
            return {"low": taps["stage3"], "high": taps[HIGH_TAP]}
        # torchvision's tap (first stride-8 block) is not a backbone tap: run the layers here.
        x, low = images, None
        for index, layer in enumerate(self.backbone.features):
            x = layer(x)
            if index == self._low_index:
                low = x
        return {"low": low, "high": x}

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the input resolution.

        Args:
            images: ``(N, 3, H, W)``, ImageNet-normalised.

        Returns:
            ``(N, num_classes, H, W)`` logits.
        """
        out = self.classifier(self.features(images))
        return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def load_weights(self, source: str | Path | Mapping[str, Tensor]) -> LoadReport:
        """Load a torchvision ``lraspp_mobilenet_v3_large`` or an mnv3det LR-ASPP checkpoint.

        Lightning checkpoints of :class:`mnv3det.tasks.segmentation.SegmentationTask` work too
        (their ``state_dict`` is unwrapped and the ``model.`` prefix stripped). Unused keys are
        reported (``LoadReport.unused`` and a warning).

        Raises:
            FileNotFoundError: the file does not exist.
            WeightsFormatError: the keys are not an LR-ASPP layout.
            CheckpointMismatchError: missing keys or shape mismatches (other arch, width,
                reduced tail or number of classes), naming the keys.
        """
        state, name = read_state_dict(source)
        state, fmt = _normalise_keys(state)
        return self._load_state(state, name, fmt)

    def _load_state(self, state: Mapping[str, Tensor], name: str, fmt: str) -> LoadReport:
        describe = (
            f"lraspp({self.backbone.arch!r}, num_classes={self.num_classes}, "
            f"width_mult={self.backbone.width_mult}, reduced_tail={self.backbone.reduced_tail})"
        )
        report = load_matching(self, state, name, fmt, describe=describe)
        if report.unused:
            warnings.warn(str(report), stacklevel=3)
        self.weights_report = report
        return report


def lraspp(
    arch: str = "large",
    num_classes: int = 19,
    width_mult: float = 1.0,
    reduced_tail: bool = True,
    dilated: bool = True,
    pooling: str = "global",
    weights: str | Path | Mapping[str, Tensor] | None = None,
    weights_backbone: str | Path | Mapping[str, Tensor] | None = None,
    *,
    low_tap: str | None = None,
    inter_channels: int = 128,
    pool_kernel: int | Sequence[int] = PAPER_POOL_KERNEL,
    pool_stride: int | Sequence[int] = PAPER_POOL_STRIDE,
    **backbone_kwargs: Any,
) -> LRASPP:
    """Build LR-ASPP on MobileNetV3 (paper §6.4).

    Args:
        arch: "large" or "small".
        num_classes: output classes (19 for Cityscapes, 21 for torchvision's VOC-label weights).
        width_mult: backbone width multiplier.
        reduced_tail: halve the last stage (paper's RF2; the paper's Cityscapes models use it).
            torchvision's LR-ASPP weights need ``False``.
        dilated: last stage dilated, high branch at output stride 16 (paper's default); ``False``
            taps it at stride 32 (the paper's "OS32" rows, cheaper).
        pooling: gate pooling, ``"global"`` (torchvision) or ``"paper"`` (49x49 window, stride
            (16, 20), clamped to the map size; see :mod:`heads.lraspp`).
        weights: torchvision ``lraspp_mobilenet_v3_large`` checkpoint or an mnv3det LR-ASPP
            checkpoint / Lightning checkpoint (path or state_dict).
        weights_backbone: an ImageNet MobileNetV3 checkpoint (torchvision/timm) for the backbone
            only (ignored when ``weights`` is given).
        low_tap: ``"stage3"`` (last stride-8 block), ``"stage3_first"`` (first stride-8 block,
            torchvision's choice) or ``None`` (automatic, see the module docstring).
        inter_channels: width of the gated branch (128 in the paper).
        pool_kernel: paper gate window in feature cells.
        pool_stride: paper gate stride in feature cells.
        **backbone_kwargs: passed to :func:`mnv3det.mobilenet_v3` (``norm_layer``,
            ``frozen_stages``, ``norm_eval``, ``frozen_bn``).

    Returns:
        An :class:`LRASPP` module.

    Raises:
        ValueError: bad ``low_tap``/``pooling``/``num_classes``.
        WeightsFormatError, CheckpointMismatchError: ``weights`` do not fit (names the keys).
    """
    if num_classes < 1:
        raise ValueError(f"lraspp: num_classes must be >= 1, got {num_classes}")
    state: dict[str, Tensor] | None = None
    name = "<state_dict>"
    if weights is not None:
        raw, name = read_state_dict(weights)
        state, fmt = _normalise_keys(raw)
        if low_tap is None:
            low_tap = "stage3_first" if fmt == "torchvision" else "stage3"
        weights_backbone = None
    low_tap = low_tap or "stage3"
    backbone = mobilenet_v3(
        arch,
        width_mult=width_mult,
        reduced_tail=reduced_tail,
        dilated=dilated,
        taps=["stage3", HIGH_TAP],
        weights=weights_backbone,
        **backbone_kwargs,
    )
    model = LRASPP(
        backbone,
        num_classes,
        low_tap=low_tap,
        inter_channels=inter_channels,
        pooling=pooling,
        pool_kernel=pool_kernel,
        pool_stride=pool_stride,
    )
    if state is not None:
        model._load_state(state, name, fmt)
    return model


__all__ = ["HIGH_TAP", "LOW_TAPS", "LRASPP", "WeightsFormatError", "lraspp"]
