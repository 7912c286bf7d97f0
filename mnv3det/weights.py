"""Loading torchvision and timm MobileNetV3 checkpoints into the backbone.

* Files are read with ``torch.load(weights_only=True)``: a checkpoint whose pickle tries to run
  code is refused (:class:`UnsafeCheckpointError`). ``.safetensors`` files are read with
  safetensors.
* The format is detected from the keys: torchvision (``features.N.block...``, also our own
  state_dict), timm (``conv_stem``/``blocks.S.B...``), optionally wrapped in ``state_dict`` /
  ``model`` / ``state_dict_ema`` and prefixed with ``module.`` or ``backbone.``.
* Keys the backbone does not use (the ImageNet classifier, layers past the deepest tap) are
  reported in a :class:`LoadReport` and a warning, never dropped silently. A checkpoint of
  another variant (width, arch, reduced tail) is a :class:`CheckpointMismatchError` naming the
  first mismatching keys and shapes.
* timm trains MobileNetV3 with BatchNorm eps 1e-5 (torchvision: 1e-3). eps is not stored in a
  checkpoint, so loading a timm checkpoint sets eps=1e-5 on the backbone's BatchNorm layers,
  which is what makes the features equal to timm's.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
STRIP_PREFIXES = ("module.", "model.", "backbone.body.", "backbone.")
TIMM_BN_EPS = 1e-5


class UnsafeCheckpointError(ValueError):
    """The checkpoint file contains pickled code and was refused."""


class CheckpointMismatchError(ValueError):
    """The checkpoint belongs to a different architecture/width than the model."""


@dataclass
class LoadReport:
    """What happened when a checkpoint was loaded.

    Attributes:
        source: file path or ``"<state_dict>"``.
        format: ``"torchvision"`` or ``"timm"``.
        loaded: number of tensors copied into the model.
        unused: checkpoint keys the model does not use (e.g. the ImageNet classifier).
    """

    source: str
    format: str
    loaded: int
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.source} ({self.format} format)"
        if self.unused:
            shown = ", ".join(self.unused[:6]) + (" ..." if len(self.unused) > 6 else "")
            text += f"; {len(self.unused)} unused keys not loaded: {shown}"
        return text


def read_state_dict(source: str | Path | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Read a state_dict from a file or mapping without unpickling code.

    Args:
        source: path to ``.pth``/``.pt``/``.ckpt``/``.safetensors`` or an in-memory mapping.

    Returns:
        ``(state_dict, source_name)`` with wrapper dicts unwrapped.

    Raises:
        FileNotFoundError: the path does not exist.
        UnsafeCheckpointError: the file's pickle would execute code.
    """
    if isinstance(source, Mapping):
        return _unwrap(dict(source)), "<state_dict>"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(path))), str(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file is not a plain tensor checkpoint and unpickling "
            f"it would run code ({str(err).splitlines()[0]}). Re-save it as a state_dict "
            f"(torch.save(model.state_dict(), ...)) or as .safetensors from a trusted source."
        ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping), got {type(obj).__name__}")
    return _unwrap(dict(obj)), str(path)


def _unwrap(state: dict) -> dict[str, Tensor]:
    for key in WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            return _unwrap(dict(state[key]))
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def strip_prefix(state: dict[str, Tensor], anchors: tuple[str, ...]) -> dict[str, Tensor]:
    """Remove a common wrapper prefix (``module.``, ``backbone.`` ...) so keys start at an anchor."""
    for prefix in STRIP_PREFIXES:
        if any(k.startswith(prefix) and k[len(prefix) :].startswith(anchors) for k in state):
            state = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
    return state


def detect_format(state: Mapping[str, Tensor]) -> str:
    """``"torchvision"`` or ``"timm"`` from the key names; ValueError when neither."""
    if any(k.startswith("features.") for k in state):
        return "torchvision"
    if "conv_stem.weight" in state or any(k.startswith("blocks.") for k in state):
        return "timm"
    sample = ", ".join(list(state)[:5])
    raise ValueError(
        "weights: not a torchvision or timm MobileNetV3 checkpoint (expected keys like "
        f"'features.0.0.weight' or 'conv_stem.weight'); first keys are: {sample}"
    )


_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)$")


def timm_to_torchvision(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename timm MobileNetV3 keys to torchvision's layout.

    timm: ``conv_stem/bn1``, ``blocks.S.B.{conv_pw,bn1,conv_dw,bn2,se.conv_reduce,se.conv_expand,
    conv_pwl,bn3}`` (``ds`` blocks: ``conv_dw,bn1,se,conv_pw,bn2``), last stage ``conv,bn1``,
    then ``conv_head``/``classifier``. torchvision: ``features.N.block.M.{0,1,fc1,fc2}``.
    Blocks are numbered in (stage, block) order, which is the torchvision feature index - 1.
    """
    blocks = sorted(
        {(int(m[1]), int(m[2])) for k in state if (m := _TIMM_BLOCK.match(k))},
    )
    index_of = {sb: i + 1 for i, sb in enumerate(blocks)}
    layer_names = {
        sb: {m[3] for k in state if (m := _TIMM_BLOCK.match(k)) and (int(m[1]), int(m[2])) == sb}
        for sb in blocks
    }
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(("conv_stem.", "bn1.")):
            part = "0" if key.startswith("conv_stem.") else "1"
            out[f"features.0.{part}.{key.split('.', 1)[1]}"] = value
            continue
        m = _TIMM_BLOCK.match(key)
        if not m:
            out[key] = value  # conv_head / classifier: reported as unused by the loader
            continue
        sb = (int(m[1]), int(m[2]))
        names, layer, param = layer_names[sb], m[3], m[4]
        prefix = f"features.{index_of[sb]}"
        has_se = "se" in names
        if "conv_pwl" in names:  # inverted residual
            slots = {"conv_pw": 0, "bn1": 0, "conv_dw": 1, "bn2": 1, "se": 2}
            slots.update(conv_pwl=3 if has_se else 2, bn3=3 if has_se else 2)
        elif "conv_dw" in names:  # depthwise-separable (first block)
            slots = {"conv_dw": 0, "bn1": 0, "se": 1}
            slots.update(conv_pw=2 if has_se else 1, bn2=2 if has_se else 1)
        else:  # conv-bn-act (the last 1x1 conv)
            out[f"{prefix}.{'0' if layer == 'conv' else '1'}.{param}"] = value
            continue
        if layer == "se":
            param = param.replace("conv_reduce", "fc1").replace("conv_expand", "fc2")
            out[f"{prefix}.block.{slots['se']}.{param}"] = value
        else:
            sub = "0" if layer.startswith("conv") else "1"
            out[f"{prefix}.block.{slots[layer]}.{sub}.{param}"] = value
    return out


def load_backbone_weights(
    model: nn.Module, source: str | Path | Mapping[str, Tensor]
) -> LoadReport:
    """Load a torchvision/timm MobileNetV3 checkpoint into a backbone.

    Args:
        model: a :class:`mnv3det.backbone.MobileNetV3Backbone`; checkpoint keys of layers it
            does not keep (past its deepest tap) are reported as unused.
        source: path or state_dict.

    Returns:
        A :class:`LoadReport`; unused keys are also announced with ``warnings.warn``.

    Raises:
        CheckpointMismatchError: missing keys or shape mismatches (another variant).
    """
    state, name = read_state_dict(source)
    state = strip_prefix(state, ("features.", "conv_stem.", "blocks."))
    fmt = detect_format(state)
    if fmt == "timm":
        state = timm_to_torchvision(state)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = TIMM_BN_EPS
    report = load_matching(model, state, name, fmt, describe=_describe(model))
    if report.unused:
        warnings.warn(str(report), stacklevel=3)
    return report


def load_matching(
    model: nn.Module, state: Mapping[str, Tensor], name: str, fmt: str, describe: str
) -> LoadReport:
    """Copy ``state`` into ``model``: every model key must be present with the same shape.

    Keys of ``state`` that the model lacks are returned as unused. Shared by the backbone and
    the task models (SSDLite, LR-ASPP) so every loader reports mismatches the same way.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        problems = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            if k in state
            else f"{k}: missing from checkpoint (model {tuple(own[k].shape)})"
            for k in own
            if k not in state or state[k].shape != own[k].shape
        ]
        raise CheckpointMismatchError(
            f"weights {name} ({fmt} format) do not fit {describe}: {len(wrong)} shape "
            f"mismatches, {len(missing)} missing keys; first: "
            + "; ".join(problems[:5])
            + ". Build the model with the arch/width_mult/reduced_tail the checkpoint was "
            "trained with."
        )
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    unused = [k for k in state if k not in own]
    return LoadReport(source=name, format=fmt, loaded=len(own), unused=unused)


def _describe(model: nn.Module) -> str:
    arch = getattr(model, "arch", "?")
    width = getattr(model, "width_mult", "?")
    tail = getattr(model, "reduced_tail", "?")
    return f"mobilenet_v3({arch!r}, width_mult={width}, reduced_tail={tail})"
