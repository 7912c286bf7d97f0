"""LR-ASPP segmentation model: the MobileNetV3 backbone with the LR-ASPP head (paper §6.4).

``lraspp("large", num_classes=19)`` builds the paper's Cityscapes model: MobileNetV3-Large with
the reduced tail (RF2, 480-channel last conv) and the last stage dilated (output stride 16),
the low-level branch tapped at stride 8 and the high-level branch at the last conv, and the
LR-ASPP head of :mod:`heads.lraspp`. ``model(images)`` returns logits ``(N, C, H, W)`` at the
input resolution (bilinear, ``align_corners=False``, like torchvision).

Input convention: images in ``[0, 1]``, like :func:`mnv3det.ssdlite`. The model normalises them
itself (:class:`~mnv3det.models.normalize.Normalize`, ImageNet mean/std by default, stored in
its description as ``image_mean``/``image_std``), so the eager model, the fast path and the ONNX
graph take the same input. torchvision's ``lraspp_mobilenet_v3_large`` takes ImageNet-normalised
images instead: ``ours(x) == tv(normalize(x))["out"]``.

Low-level tap. The paper (Fig. 10) draws the low branch from the "1/8 resolution" features;
``low_tap`` is any stride-8 tap of the backbone (:func:`mnv3det.backbone.tap_info`), the taps
themselves compute it (nothing is re-run by hand here). Two readings of the paper have names:

* ``"stage3"`` (default): the *last* block output at stride 8 (``block6`` = ``features.6`` of
  Large, 40 ch), the complete stride-8 stage.
* ``"stage3_first"``: an alias of the *first* stride-8 block (``block4`` = ``features.4`` of
  Large, ``block2`` of Small). This is what torchvision's ``lraspp_mobilenet_v3_large`` taps (its
  builder takes the strided "C2" block itself), so torchvision checkpoints need it for identical
  logits. The alias is kept as given in the description (older checkpoints store it).

Other stride-8 taps (``block5`` of Large, ``stage4_expand``) can be chosen too, e.g. from a
config (``SegmentationTask.low_tap``).

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

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from heads.label_map import bilinear_argmax
from heads.lraspp import PAPER_POOL_KERNEL, PAPER_POOL_STRIDE, LRASPPHead
from mnv3det.backbone import (
    MobileNetV3Backbone,
    block_stages,
    block_tap,
    checkpoint_has_reduced_tail,
    mobilenet_v3,
    tap_info,
)
from mnv3det.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mnv3det.pretrained import resolve_weights
from mnv3det.weights import (
    DESCRIPTION_VERSION,
    Checkpoint,
    CheckpointFormatError,
    LoadReport,
    load_matching,
    read_checkpoint,
    resolve_arguments,
    strip_prefix,
)

LOW_TAPS = ("stage3", "stage3_first")
"""The named low taps (any other stride-8 backbone tap is accepted as well)."""
LOW_STRIDE = 8
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
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
}
#: Description keys of older checkpoints (SegmentationTask's ``mean``/``std`` data facts).
_LEGACY_KEYS = {"mean": "image_mean", "std": "image_std"}


class WeightsFormatError(CheckpointFormatError):
    """The checkpoint is neither a torchvision LR-ASPP nor an mnv3det LR-ASPP state_dict."""


def backbone_low_tap(low_tap: str, arch: str) -> str:
    """The backbone tap a ``low_tap`` name stands for (``"stage3_first"`` -> ``block4`` of Large)."""
    if low_tap == "stage3_first":
        return block_tap(block_stages(arch).index(3) + 1)
    return low_tap


def check_low_tap(low_tap: str, arch: str, width_mult: float = 1.0) -> str:
    """Validate a ``low_tap`` and return its backbone tap.

    Raises:
        ValueError: not a stride-8 tap of this variant (names the choices).
    """
    taps = tap_info(arch, width_mult)  # stride 8 does not depend on the tail or the dilation
    name = backbone_low_tap(low_tap, arch)
    at_8 = [t.name for t in taps if t.stride == LOW_STRIDE]
    if name not in at_8:
        raise ValueError(
            f"lraspp: low_tap must be a stride-{LOW_STRIDE} tap of MobileNetV3-{arch}: "
            f"'stage3_first' (alias of {backbone_low_tap('stage3_first', arch)}) or one of "
            f"{at_8}; got {low_tap!r}"
        )
    return name


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
    :class:`~heads.lraspp.LRASPPHead`), ``normalize`` (the input
    :class:`~mnv3det.models.normalize.Normalize`), ``low_tap`` (as given; the backbone's first
    tap is what it stands for), ``num_classes``, ``output_stride``, ``weights_report`` (a
    :class:`~mnv3det.weights.LoadReport` when ``weights`` were given).

    Args:
        backbone: a :class:`~mnv3det.backbone.MobileNetV3Backbone` with taps
            ``[backbone_low_tap(low_tap), "last_conv"]``.
        num_classes: output classes.
        low_tap: the low branch's tap: a stride-8 backbone tap or ``"stage3_first"``.
        inter_channels: width of the gated branch.
        pooling: gate pooling, ``"global"`` or ``"paper"``.
        pool_kernel: paper gate window in feature cells.
        pool_stride: paper gate stride in feature cells.
        image_mean: normalisation mean of the ``[0, 1]`` input (ImageNet).
        image_std: normalisation std of the ``[0, 1]`` input (ImageNet).
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
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        low_name = check_low_tap(low_tap, backbone.arch, backbone.width_mult)
        names = [f.name for f in backbone.feature_info]
        if names != [low_name, HIGH_TAP]:
            raise ValueError(
                f"LRASPP needs a backbone with taps [{low_name!r}, {HIGH_TAP!r}], got {names}"
            )
        self.normalize = Normalize(image_mean, image_std)
        self.backbone = backbone
        self._low_tap = low_tap
        self.num_classes = num_classes
        low_info, high_info = backbone.feature_info
        self.output_stride = high_info.stride
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
        """Data facts from the checkpoint (``label_map``, ``class_names``)."""

    @property
    def low_tap(self) -> str:
        """The low branch's tap as given (fixed at construction: it decides the backbone)."""
        return self._low_tap

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
            **self.normalize.description,
            **self.meta,
        }

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """The head's inputs ``{"low": stride-8 map, "high": last conv}`` of ``[0, 1]`` images."""
        low, high = self.backbone(self.normalize(images)).values()
        return {"low": low, "high": high}

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the input resolution.

        Args:
            images: ``(N, 3, H, W)`` RGB in ``[0, 1]`` (normalised here, see :attr:`normalize`).

        Returns:
            ``(N, num_classes, H, W)`` logits.
        """
        out = self.classifier(self.features(images))
        return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def predict_labels(self, images: Tensor) -> Tensor:
        """Label map at the input resolution, without upsampling every class's logits.

        ``self(images).argmax(1)`` computed by :func:`heads.label_map.bilinear_argmax` from
        the stride-8 logits (the same labels up to float-rounding ties; see
        docs/deployment.md). :meth:`forward` keeps returning full-resolution logits.

        Args:
            images: ``(N, 3, H, W)`` RGB in ``[0, 1]``.

        Returns:
            ``(N, H, W)`` int64 class indices.
        """
        low = self.classifier(self.features(images))
        return bilinear_argmax(low, tuple(images.shape[-2:]))

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
    weights: str | Path | Mapping[str, Tensor] | Checkpoint | Enum | None = None,
    weights_backbone: str | Path | Mapping[str, Tensor] | Enum | None = None,
    *,
    low_tap: str | None = None,
    inter_channels: int | None = None,
    pool_kernel: int | Sequence[int] | None = None,
    pool_stride: int | Sequence[int] | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
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
            :class:`~mnv3det.weights.Checkpoint`), or a name, downloaded once (see
            :mod:`mnv3det.pretrained`): ``"DEFAULT"``, ``"COCO_WITH_VOC_LABELS_V1"``,
            ``LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1`` or its string (Large
            only; 21 classes, the full tail and the dilation are read from the file).
        weights_backbone: an ImageNet MobileNetV3 checkpoint (torchvision/timm) for the backbone
            only (ignored when ``weights`` is given), or one of :func:`mnv3det.mobilenet_v3`'s
            weight names (``"IMAGENET1K_V1"``, ``"hf-hub:timm/..."``; these have the full tail:
            pass ``reduced_tail=False``).
        low_tap: ``"stage3"`` (last stride-8 block), ``"stage3_first"`` (first stride-8 block,
            torchvision's choice), another stride-8 backbone tap (``"block5"``,
            ``"stage4_expand"``) or ``None`` (automatic, see the module docstring).
        inter_channels: width of the gated branch (default 128, the paper's).
        pool_kernel: paper gate window in feature cells (default 49).
        pool_stride: paper gate stride in feature cells (default (16, 20)).
        image_mean: mean the model normalises its ``[0, 1]`` input with (default ImageNet's,
            :data:`~mnv3det.models.normalize.IMAGENET_MEAN`).
        image_std: std of that normalisation (default ImageNet's).
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
    weights = resolve_weights(weights, "lraspp", arch)
    ckpt = read_checkpoint(weights) if weights is not None else None
    state, fmt, inferred = None, "", {}
    if ckpt is not None:
        ckpt = _upgrade_description(ckpt)
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
    low_tap = args["low_tap"] or "stage3"
    backbone = mobilenet_v3(
        args["arch"],
        width_mult=args["width_mult"],
        reduced_tail=args["reduced_tail"],
        dilated=args["dilated"],
        taps=[check_low_tap(low_tap, args["arch"], args["width_mult"]), HIGH_TAP],
        weights=weights_backbone,
        **backbone_kwargs,
    )
    model = LRASPP(
        backbone,
        args["num_classes"],
        low_tap=low_tap,
        inter_channels=args["inter_channels"],
        pooling=args["pooling"],
        pool_kernel=args["pool_kernel"],
        pool_stride=args["pool_stride"],
        image_mean=args["image_mean"],
        image_std=args["image_std"],
    )
    if ckpt is not None:
        model.meta = {
            k: ckpt.description[k] for k in ("label_map", "class_names") if k in ckpt.description
        }
        model._load_state(state, ckpt.name, fmt)
    return model


def _upgrade_description(ckpt: Checkpoint) -> Checkpoint:
    """Older descriptions name the input normalisation ``mean``/``std`` (a task data fact)."""
    old = {k: v for k, v in ckpt.description.items() if k in _LEGACY_KEYS}
    if not old:
        return ckpt
    description = {k: v for k, v in ckpt.description.items() if k not in _LEGACY_KEYS}
    for key, value in old.items():
        description.setdefault(_LEGACY_KEYS[key], value)
    return dataclasses.replace(ckpt, description=description)


__all__ = [
    "HIGH_TAP",
    "LOW_STRIDE",
    "LOW_TAPS",
    "LRASPP",
    "LRASPP_DEFAULTS",
    "WeightsFormatError",
    "backbone_low_tap",
    "check_low_tap",
    "lraspp",
]
