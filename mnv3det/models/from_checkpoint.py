"""The one way from a checkpoint to a model: :func:`load_model` (and :func:`save_model`).

Every consumer (``mnv3det.ssdlite/lraspp(weights=...)``, ``mnv3det export``, ``python -m
mnv3det.quantize``, the benchmark, the tasks and the demo) goes through the builders of
:mod:`mnv3det.models.ssdlite` / :mod:`mnv3det.models.lraspp`, which read the checkpoint with
:func:`mnv3det.weights.read_checkpoint` and take every argument not given from its description.
:func:`load_model` only picks the builder:

* our checkpoints (a DetectionTask/SegmentationTask ``.ckpt``, or a file written by
  :func:`save_model`) name it in ``checkpoint["mnv3det"]["builder"]``; older ``.ckpt`` files in
  their hyper-parameters;
* otherwise the key layout decides (SSDLite: ``head.classification_head.*``; LR-ASPP:
  ``classifier.cbr.*``), so torchvision's SSDLite and LR-ASPP checkpoints load too.

A checkpoint that is neither raises :class:`~mnv3det.weights.CheckpointFormatError` naming the
file; missing or unreadable files raise :class:`~mnv3det.weights.CheckpointNotFoundError` /
:class:`~mnv3det.weights.CheckpointReadError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mnv3det.weights import (
    DESCRIPTION_KEY,
    Checkpoint,
    CheckpointFormatError,
    read_checkpoint,
    strip_prefix,
)

__all__ = ["BUILDERS", "detect_builder", "load_model", "save_model"]

BUILDERS = ("ssdlite", "lraspp")


def detect_builder(ckpt: Checkpoint) -> str:
    """``"ssdlite"`` or ``"lraspp"`` from the description, else from the key layout.

    Raises:
        CheckpointFormatError: the checkpoint holds neither model (names the file).
    """
    builder = ckpt.description.get("builder")
    if builder in BUILDERS:
        return builder
    state = strip_prefix(dict(ckpt.state), ("backbone.", "extra.", "head.", "classifier."))
    if any(k.startswith("head.classification_head.") for k in state):
        return "ssdlite"
    if any(k.startswith("classifier.cbr.") for k in state):
        return "lraspp"
    sample = ", ".join(list(ckpt.state)[:4])
    raise CheckpointFormatError(
        f"checkpoint {ckpt.name} is neither an SSDLite nor an LR-ASPP checkpoint: expected a "
        "DetectionTask/SegmentationTask .ckpt, a file written by mnv3det, or torchvision's "
        "ssdlite320_mobilenet_v3_large / lraspp_mobilenet_v3_large weights (keys "
        f"'head.classification_head...' or 'classifier.cbr...'); first keys are: {sample}"
    )


def load_model(
    source: str | Path | Mapping[str, Tensor] | Checkpoint,
    builder: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Rebuild the exact model of any checkpoint, in eval mode.

    Args:
        source: a file (``.ckpt``, ``.pt``, ``.pth``, ``.safetensors``), a state_dict / checkpoint
            dict, or a read :class:`~mnv3det.weights.Checkpoint`.
        builder: ``"ssdlite"`` or ``"lraspp"`` to insist on one (a checkpoint of the other is
            a :class:`~mnv3det.weights.CheckpointFormatError`); ``None`` detects it.
        **overrides: builder arguments (e.g. ``score_thresh=0.3``). ``None`` values are
            ignored; an argument contradicting the checkpoint's description raises
            :class:`~mnv3det.weights.CheckpointConflictError`.

    Returns:
        An :class:`~mnv3det.models.ssdlite.SSDLite` or
        :class:`~mnv3det.models.lraspp.LRASPP` in eval mode; ``model.description`` is the
        full description (architecture, input size, classes, label map, class names).
    """
    ckpt = read_checkpoint(source)
    found = detect_builder(ckpt)
    if builder is not None and builder != found:
        raise CheckpointFormatError(
            f"checkpoint {ckpt.name} holds a {found} model, not {builder}; "
            f"use --model {found} / builder={found!r}"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if found == "ssdlite":
        from mnv3det.models.ssdlite import ssdlite

        model = ssdlite(weights=ckpt, **overrides)
    else:
        from mnv3det.models.lraspp import lraspp

        model = lraspp(weights=ckpt, **overrides)
    return model.eval()


def save_model(model: nn.Module, path: str | Path, **meta: Any) -> Path:
    """Write a plain weights file that :func:`load_model` rebuilds exactly.

    The file is ``{"state_dict": ..., "mnv3det": model.description}`` (plain types, loadable
    with ``torch.load(weights_only=True)``); ``meta`` (e.g. ``label_map``, ``class_names``) is
    added to the description.

    Args:
        model: an SSDLite or LR-ASPP.
        path: output file (parent folders are created).
        **meta: extra description entries.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    description = {**getattr(model, "description", {}), **meta}
    torch.save({"state_dict": model.state_dict(), DESCRIPTION_KEY: description}, path)
    return path
