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

With ``low_tap=None`` the choice is automatic: the checkpoint's description when it has one,
``"stage3_first"`` when ``weights`` is a torchvision LR-ASPP checkpoint (keys
``backbone.N...``/``classifier.*``), else ``"stage3"``.

Loading torchvision's checkpoint. torchvision builds ``lraspp_mobilenet_v3_large`` with
``dilated=True`` and the *full* tail (``reduced_tail=False``, 960-ch last conv) and 21 VOC
classes; ``lraspp("large", weights="lraspp.pth")`` reads the tail and the number of classes
from the tensor shapes and the low tap from the key layout, and gives the same logits. Its
backbone keys ``backbone.N.*`` map to our ``backbone.features.N.*`` and its ``classifier.*``
keys are ours unchanged.

Checkpoints of ours carry a description (``checkpoint["mnv3det"]``, see
:attr:`LRASPP.description`): arguments left at ``None`` are taken from it, and an explicit
argument that contradicts it is a :class:`~mnv3det.weights.CheckpointConflictError`.
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
from mnv3det.weights import (
    DESCRIPTION_VERSION,
    Checkpoint,
    CheckpointFormatError,
    LoadReport,
    checkpoint_has_reduced_tail,
    load_matching,
    read_checkpoint,
    resolve_arguments,
    strip_prefix,
)

LOW_TAPS = ("stage3", "stage3_first")
HIGH_TAP = "last_conv"
_TV_BACKBONE_KEY = re.compile(r"^backbone\.(\d+)\.")
_LRASPP_ANCHORS = ("backbone.", "classifier.")
#: Documented defaults of :func:`lraspp` (used when neither an argument nor the checkpoint
#: gives a value; ``low_tap`` ``None`` = automatic).
LRASPP_DEFAULTS: dict[str, object] = {
    "arch": "large",
    "num_classes": 19,
    "width_mult": 1.0,
    "reduced_tail": True,
    "dilated": True,
    "pooling": "global",
    "low_tap": None,
    "inter_channels": 128,
    "pool_kernel": PAPER_POOL_KERNEL,
    "pool_stride": PAPER_POOL_STRIDE,
}


class WeightsFormatError(CheckpointFormatError):
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


def _normalise_keys(
    state: Mapping[str, Tensor], name: str = "<state_dict>"
) -> tuple[dict[str, Tensor], str]:
    """Strip wrapper prefixes and detect ``"torchvision"`` or ``"mnv3det"`` key layout."""
    state = strip_prefix(dict(state), _LRASPP_ANCHORS)
    if any(k.startswith("backbone.features.") for k in state):
        return state, "mnv3det"
    if any(_TV_BACKBONE_KEY.match(k) for k in state):
        renamed = {_TV_BACKBONE_KEY.sub(r"backbone.features.\1.", k): v for k, v in state.items()}
        return renamed, "torchvision"
    sample = ", ".join(list(state)[:5])
    raise WeightsFormatError(
        f"checkpoint {name} is not an LR-ASPP checkpoint (expected torchvision's keys like "
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
        self.dilated = bool(backbone.dilated)
        self.inter_channels = int(inter_channels)
        self.pooling = pooling
        self.pool_kernel = _plain_pair(pool_kernel)
        self.pool_stride = _plain_pair(pool_stride)
        self.weights_report: LoadReport | None = None
        self.meta: dict = {}
        """Data facts from the checkpoint (``label_map``, ``class_names``, ``mean``, ``std``)."""

    @property
    def description(self) -> dict:
        """Everything :func:`lraspp` needs to rebuild this model, as plain types.

        Stored in checkpoints under ``"mnv3det"`` (with the data facts of :attr:`meta`); read
        back by :func:`mnv3det.models.from_checkpoint.load_model`.
        """
        bb = self.backbone
        return {
            "version": DESCRIPTION_VERSION,
            "task": "segmentation",
            "builder": "lraspp",
            "arch": bb.arch,
            "width_mult": float(bb.width_mult),
            "reduced_tail": bool(bb.reduced_tail),
            "dilated": self.dilated,
            "pooling": self.pooling,
            "pool_kernel": list(self.pool_kernel),
            "pool_stride": list(self.pool_stride),
            "low_tap": self.low_tap,
            "inter_channels": self.inter_channels,
            "num_classes": int(self.num_classes),
            "output_stride": int(self.output_stride),
            **self.meta,
        }

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
        ckpt = read_checkpoint(source)
        state, fmt = _normalise_keys(ckpt.state, ckpt.name)
        return self._load_state(state, ckpt.name, fmt)

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


def _plain_pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _infer_lraspp(
    state: Mapping[str, Tensor], fmt: str, arch: str, width_mult: float
) -> dict[str, object]:
    """What the tensors say: tail, classes, and (torchvision's layout) the low tap."""
    inferred: dict[str, object] = {
        "reduced_tail": checkpoint_has_reduced_tail(state, arch, width_mult),
        "low_tap": "stage3_first" if fmt == "torchvision" else "stage3",
    }
    low = state.get("classifier.low_classifier.weight")
    if low is not None:
        inferred["num_classes"] = int(low.shape[0])
    inter = state.get("classifier.cbr.0.weight")
    if inter is not None:
        inferred["inter_channels"] = int(inter.shape[0])
    if fmt == "torchvision":
        inferred["dilated"] = True  # torchvision's builder always dilates the last stage
    return inferred


def lraspp(
    arch: str | None = None,
    num_classes: int | None = None,
    width_mult: float | None = None,
    reduced_tail: bool | None = None,
    dilated: bool | None = None,
    pooling: str | None = None,
    weights: str | Path | Mapping[str, Tensor] | Checkpoint | None = None,
    weights_backbone: str | Path | Mapping[str, Tensor] | None = None,
    *,
    low_tap: str | None = None,
    inter_channels: int | None = None,
    pool_kernel: int | Sequence[int] | None = None,
    pool_stride: int | Sequence[int] | None = None,
    **backbone_kwargs: Any,
) -> LRASPP:
    """Build LR-ASPP on MobileNetV3 (paper §6.4).

    Every argument left at ``None`` is taken from ``weights`` when the checkpoint describes its
    model (ours: ``checkpoint["mnv3det"]``; older ``.ckpt`` files: their hyper-parameters), else
    inferred from the tensors (``reduced_tail``, ``num_classes``, ``inter_channels``; for
    torchvision's checkpoint also ``low_tap="stage3_first"`` and ``dilated=True``), else the
    default shown below. An explicit argument that contradicts the description raises
    :class:`~mnv3det.weights.CheckpointConflictError` naming both values.

    Args:
        arch: "large" (default) or "small".
        num_classes: output classes (default 19 for Cityscapes; torchvision's VOC-label weights
            have 21, read from them).
        width_mult: backbone width multiplier (default 1.0).
        reduced_tail: halve the last stage (paper's RF2, default ``True``: the paper's
            Cityscapes models use it); read from ``weights`` when given.
        dilated: last stage dilated, high branch at output stride 16 (default ``True``, the
            paper's); ``False`` taps it at stride 32 (the paper's "OS32" rows, cheaper).
        pooling: gate pooling, ``"global"`` (default, torchvision) or ``"paper"`` (49x49 window,
            stride (16, 20), clamped to the map size; see :mod:`heads.lraspp`).
        weights: torchvision ``lraspp_mobilenet_v3_large`` checkpoint or an mnv3det LR-ASPP
            checkpoint / Lightning checkpoint (path, state_dict or a read
            :class:`~mnv3det.weights.Checkpoint`).
        weights_backbone: an ImageNet MobileNetV3 checkpoint (torchvision/timm) for the backbone
            only (ignored when ``weights`` is given).
        low_tap: ``"stage3"`` (last stride-8 block), ``"stage3_first"`` (first stride-8 block,
            torchvision's choice) or ``None`` (automatic, see the module docstring).
        inter_channels: width of the gated branch (default 128, the paper's).
        pool_kernel: paper gate window in feature cells (default 49).
        pool_stride: paper gate stride in feature cells (default (16, 20)).
        **backbone_kwargs: passed to :func:`mnv3det.mobilenet_v3` (``norm_layer``,
            ``frozen_stages``, ``norm_eval``, ``frozen_bn``).

    Returns:
        An :class:`LRASPP` module; ``model.description`` says how it was built.

    Raises:
        ValueError: bad ``low_tap``/``pooling``/``num_classes``.
        CheckpointNotFoundError, CheckpointReadError: ``weights`` is missing or unreadable.
        WeightsFormatError: ``weights`` is not an LR-ASPP checkpoint.
        CheckpointConflictError: an argument contradicts the checkpoint.
        CheckpointMismatchError: the tensors do not fit (names the keys).
    """
    explicit = {k: v for k, v in locals().items() if k in LRASPP_DEFAULTS}
    ckpt = read_checkpoint(weights) if weights is not None else None
    state, fmt, inferred = None, "", {}
    if ckpt is not None:
        state, fmt = _normalise_keys(ckpt.state, ckpt.name)
        described = ckpt.description
        inferred = _infer_lraspp(
            state,
            fmt,
            explicit["arch"] or described.get("arch") or LRASPP_DEFAULTS["arch"],
            explicit["width_mult"] or described.get("width_mult") or LRASPP_DEFAULTS["width_mult"],
        )
        weights_backbone = None
    args = resolve_arguments("lraspp", explicit, ckpt, LRASPP_DEFAULTS, inferred)
    if args["num_classes"] < 1:
        raise ValueError(f"lraspp: num_classes must be >= 1, got {args['num_classes']}")
    backbone = mobilenet_v3(
        args["arch"],
        width_mult=args["width_mult"],
        reduced_tail=args["reduced_tail"],
        dilated=args["dilated"],
        taps=["stage3", HIGH_TAP],
        weights=weights_backbone,
        **backbone_kwargs,
    )
    model = LRASPP(
        backbone,
        args["num_classes"],
        low_tap=args["low_tap"] or "stage3",
        inter_channels=args["inter_channels"],
        pooling=args["pooling"],
        pool_kernel=args["pool_kernel"],
        pool_stride=args["pool_stride"],
    )
    if ckpt is not None:
        model.meta = {
            k: ckpt.description[k]
            for k in ("label_map", "class_names", "mean", "std")
            if k in ckpt.description
        }
        model._load_state(state, ckpt.name, fmt)
    return model


__all__ = ["HIGH_TAP", "LOW_TAPS", "LRASPP", "LRASPP_DEFAULTS", "WeightsFormatError", "lraspp"]
