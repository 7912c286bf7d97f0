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

Task checkpoints (ours and Lightning's ``.ckpt``) are read here too: :func:`read_checkpoint`
returns the tensors plus the model description the tasks store under
``checkpoint["mnv3det"]`` (:data:`DESCRIPTION_KEY`), or one rebuilt from the
``hyper_parameters`` of older ``.ckpt`` files. :func:`resolve_arguments` merges that description
with a builder's explicit arguments (a contradiction is a :class:`CheckpointConflictError`). A
missing, truncated, empty or non-checkpoint file is a :class:`CheckpointNotFoundError` /
:class:`CheckpointReadError` naming the file; a checkpoint of another network is a
:class:`CheckpointFormatError`.
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
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.body.", "backbone.")
TIMM_BN_EPS = 1e-5
DESCRIPTION_KEY = "mnv3det"
"""Key of the model description in our checkpoints (a plain dict, see :func:`read_checkpoint`)."""
DESCRIPTION_VERSION = 1


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint file does not exist."""


class CheckpointReadError(ValueError):
    """The file is not a readable checkpoint (empty, truncated, or not a PyTorch file)."""


class CheckpointFormatError(ValueError):
    """The checkpoint holds tensors of another network than the one asked for."""


class UnsafeCheckpointError(ValueError):
    """The checkpoint file contains pickled code and was refused."""


class CheckpointMismatchError(ValueError):
    """The checkpoint belongs to a different architecture/width than the model."""


class CheckpointConflictError(ValueError):
    """An explicit builder argument contradicts what the checkpoint was trained with."""


@dataclass
class Checkpoint:
    """A checkpoint read by :func:`read_checkpoint`.

    Attributes:
        state: the tensors (wrapper dicts such as ``state_dict`` unwrapped, prefixes kept).
        name: the file path or ``"<state_dict>"`` (used in messages).
        description: the model description (``checkpoint["mnv3det"]`` or one rebuilt from a
            Lightning checkpoint's ``hyper_parameters``); empty when the file has none.
        described_by: where ``description`` came from: ``"mnv3det"``,
            ``"hyper_parameters"`` or ``""``.
    """

    state: dict[str, Tensor]
    name: str
    description: dict = field(default_factory=dict)
    described_by: str = ""


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
        source: path to ``.pth``/``.pt``/``.ckpt``/``.safetensors``, an in-memory mapping or a
            :class:`Checkpoint`.

    Returns:
        ``(state_dict, source_name)`` with wrapper dicts unwrapped.

    Raises:
        CheckpointNotFoundError: the path does not exist.
        CheckpointReadError: the file is empty, truncated or not a checkpoint.
        UnsafeCheckpointError: the file's pickle would execute code.
    """
    ckpt = read_checkpoint(source)
    return ckpt.state, ckpt.name


def read_checkpoint(source: str | Path | Mapping[str, Tensor] | Checkpoint) -> Checkpoint:
    """Read any checkpoint: tensors plus the model description when it has one.

    Args:
        source: a file (``.pth``/``.pt``/``.ckpt``/``.safetensors``), a mapping (a state_dict or
            a whole checkpoint dict) or an already read :class:`Checkpoint` (returned as is).

    Returns:
        A :class:`Checkpoint`.

    Raises:
        CheckpointNotFoundError: the path does not exist.
        CheckpointReadError: the file is empty, truncated, not a PyTorch/safetensors file, or
            holds no tensors.
        UnsafeCheckpointError: the file's pickle would execute code.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return _checkpoint_from(dict(source), "<state_dict>")
    path = Path(source)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} is a directory, expected a file")
    expected = (
        "expected a PyTorch checkpoint (torch.save of a state_dict, or a Lightning .ckpt) "
        "or a .safetensors file"
    )
    if path.stat().st_size == 0:
        raise CheckpointReadError(f"checkpoint {path} is empty (0 bytes); {expected}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _checkpoint_from(dict(load_file(str(path))), str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointReadError(
                f"checkpoint {path} could not be read as safetensors ({_first_line(err)}); "
                "the file may be truncated or corrupt"
            ) from err
    with path.open("rb") as handle:
        head = handle.read(16)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: zip, legacy: pickle
        raise CheckpointReadError(
            f"checkpoint {path} is not a PyTorch checkpoint ({_looks_like(head)}); {expected}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise CheckpointReadError(
                f"checkpoint {path} is not a PyTorch checkpoint ({_first_line(err)}); {expected}"
            ) from err
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file is not a plain tensor checkpoint and unpickling "
            f"it would run code ({_first_line(err)}). Re-save it as a state_dict "
            f"(torch.save(model.state_dict(), ...)) or as .safetensors from a trusted source."
        ) from err
    except (RuntimeError, EOFError, KeyError, OSError, ValueError, IndexError) as err:
        if "zip archive" in str(err) or isinstance(err, EOFError):
            what = "truncated or corrupt (the zip archive cannot be read)"
        else:
            what = f"not readable ({type(err).__name__}: {_first_line(err)})"
        raise CheckpointReadError(
            f"checkpoint {path} is {what}; {expected}. Re-download or re-save it."
        ) from err
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(
            f"checkpoint {path}: expected a state_dict (a mapping of tensors), got "
            f"{type(obj).__name__}"
        )
    return _checkpoint_from(dict(obj), str(path))


def _looks_like(head: bytes) -> str:
    """A few words on what a file that is not a checkpoint looks like, from its first bytes."""
    kinds = {
        b"\xff\xd8\xff": "it looks like a JPEG image",
        b"\x89PNG": "it looks like a PNG image",
        b"\x1f\x8b": "it looks like a gzip archive",
        b"<": "it looks like HTML/XML, e.g. a download error page",
        b"{": "it looks like JSON text",
        b"version https:/": "it may be a Git LFS pointer, not the file: run git lfs pull",
    }
    for magic, text in kinds.items():
        if head.startswith(magic):
            return text
    if all(32 <= b < 127 or b in b"\r\n\t" for b in head):
        return "it looks like a text file"
    return f"unknown format, first bytes {head[:8]!r}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _checkpoint_from(obj: dict, name: str) -> Checkpoint:
    description, described_by = {}, ""
    if isinstance(obj.get(DESCRIPTION_KEY), Mapping):
        description, described_by = dict(obj[DESCRIPTION_KEY]), DESCRIPTION_KEY
    elif isinstance(obj.get("hyper_parameters"), Mapping):
        description = description_from_hparams(obj["hyper_parameters"])
        described_by = "hyper_parameters" if description else ""
    state = _unwrap(obj)
    if not state:
        raise CheckpointReadError(
            f"checkpoint {name} holds no tensors (top-level keys: "
            f"{', '.join(map(str, list(obj)[:8])) or 'none'}); expected a state_dict"
        )
    return Checkpoint(state=state, name=name, description=description, described_by=described_by)


#: Hyper-parameters of DetectionTask / SegmentationTask that describe the model.
_DETECTION_HPARAMS = (
    "arch",
    "num_classes",
    "size",
    "width_mult",
    "reduced_tail",
    "score_thresh",
    "nms_thresh",
    "detections_per_img",
    "topk_candidates",
)
_SEGMENTATION_HPARAMS = (
    "arch",
    "num_classes",
    "width_mult",
    "reduced_tail",
    "dilated",
    "pooling",
    "low_tap",
    "class_names",
    "mean",
    "std",
)


def description_from_hparams(hparams: Mapping) -> dict:
    """A model description from the ``hyper_parameters`` of a task ``.ckpt`` without one.

    Checkpoints written before the tasks stored ``checkpoint["mnv3det"]`` still name the
    builder arguments in their hyper-parameters (DetectionTask: ``size``, ``score_thresh`` ...;
    SegmentationTask: ``dilated``, ``pooling`` ...). ``None`` values (automatic choices) are
    left out. Returns ``{}`` when the hyper-parameters are not those of one of our tasks.
    """
    if "pooling" in hparams or "dilated" in hparams:
        builder, task, keys = "lraspp", "segmentation", _SEGMENTATION_HPARAMS
    elif "size" in hparams and "arch" in hparams:
        builder, task, keys = "ssdlite", "detection", _DETECTION_HPARAMS
    else:
        return {}
    out = {"version": DESCRIPTION_VERSION, "task": task, "builder": builder}
    out.update({k: hparams[k] for k in keys if hparams.get(k) is not None})
    return out


def _same(a: object, b: object) -> bool:
    """Equality that treats lists and tuples alike and ``512`` as ``(512, 512)`` for sizes."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (list, tuple)) and isinstance(b, int) and not isinstance(b, bool):
        return len(a) == 2 and all(_same(x, b) for x in a)
    if isinstance(b, (list, tuple)) and isinstance(a, int) and not isinstance(a, bool):
        return _same(b, a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def resolve_arguments(
    builder: str,
    explicit: Mapping[str, object],
    ckpt: Checkpoint | None,
    defaults: Mapping[str, object],
    inferred: Mapping[str, object] | None = None,
    overridable: tuple[str, ...] = (),
) -> dict[str, object]:
    """Merge a builder's arguments with what a checkpoint says about its model.

    For every key of ``defaults``: an explicit (non-``None``) argument wins, else the
    checkpoint's description, else what was inferred from the tensors, else the default. An
    explicit argument that differs from the description raises, unless the key is in
    ``overridable`` (post-processing settings such as ``score_thresh``).

    Args:
        builder: ``"ssdlite"`` or ``"lraspp"`` (for messages).
        explicit: the arguments the caller gave (``None`` = not given).
        ckpt: the checkpoint, or ``None``.
        defaults: the documented default of every argument.
        inferred: values read from tensor shapes / key layout (used when not described).
        overridable: keys an explicit argument may change without an error.

    Returns:
        The resolved value of every key of ``defaults``.

    Raises:
        CheckpointConflictError: an explicit argument contradicts the description.
    """
    description = ckpt.description if ckpt is not None else {}
    described_builder = description.get("builder")
    if ckpt is not None and described_builder not in (None, builder):
        raise CheckpointFormatError(
            f"checkpoint {ckpt.name} holds a {described_builder} model "
            f"({description.get('task', '?')} task), not {builder}; use "
            f"mnv3det.{described_builder}(weights=...) or mnv3det.models.from_checkpoint."
            "load_model"
        )
    inferred = inferred or {}
    out: dict[str, object] = {}
    for key, default in defaults.items():
        given = explicit.get(key)
        if key in description:
            value = description[key]
            if given is not None and not _same(given, value) and key not in overridable:
                raise CheckpointConflictError(
                    f"{builder}: {key}={given!r} but checkpoint {ckpt.name} was trained with "
                    f"{key}={value!r}; drop the argument or pass {key}={value!r}"
                )
            out[key] = given if given is not None else value
        elif given is not None:
            out[key] = given
        elif inferred.get(key) is not None:
            out[key] = inferred[key]
        else:
            out[key] = default
    return out


def _unwrap(state: dict) -> dict[str, Tensor]:
    for key in WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            return _unwrap(dict(state[key]))
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def strip_prefix(state: dict[str, Tensor], anchors: tuple[str, ...]) -> dict[str, Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``, ``backbone.`` ...).

    The one prefix-stripping helper of the package. A Lightning checkpoint of one of our tasks
    (keys ``model.*`` and, with EMA, ``ema.module.*``) keeps only its model's tensors, the EMA
    ones when present (those are the evaluated weights). Then every prefix of
    :data:`STRIP_PREFIXES` is removed, repeatedly (e.g. ``model.module._orig_mod.``), as long as
    what follows it starts with one of ``anchors`` (the model's own top-level key names), so
    keys that already start at an anchor are never cut.

    Args:
        state: the tensors.
        anchors: key beginnings of the model being loaded, e.g. ``("features.",)``.

    Returns:
        The renamed tensors (keys without the prefix are kept unchanged).
    """
    for prefix in ("ema.module.", "model."):
        if any(k.startswith(prefix) and k[len(prefix) :].startswith(anchors) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if any(k.startswith(prefix) and k[len(prefix) :].startswith(anchors) for k in state):
                if all(k.startswith(anchors) for k in state):
                    continue
                state = {
                    (k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()
                }
                changed = True
    return state


def detect_format(state: Mapping[str, Tensor], name: str = "<state_dict>") -> str:
    """``"torchvision"`` or ``"timm"`` from the key names; CheckpointFormatError when neither."""
    if any(k.startswith("features.") for k in state):
        return "torchvision"
    if "conv_stem.weight" in state or any(k.startswith("blocks.") for k in state):
        return "timm"
    sample = ", ".join(list(state)[:5])
    raise CheckpointFormatError(
        f"checkpoint {name} is not a torchvision or timm MobileNetV3 checkpoint (expected keys like "
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
    fmt = detect_format(state, name)
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
