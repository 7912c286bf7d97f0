"""Weights by name: torchvision's weight enums and timm's Hugging Face ids, resolved to files.

Every builder calls :func:`resolve_weights` first, so ``weights=`` (and ``weights_backbone=``)
take, besides a file path or a state_dict, the names each ecosystem uses:

============================  =================================================================
builder                       names
============================  =================================================================
``mobilenet_v3("large")``     ``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``,
                              ``MobileNet_V3_Large_Weights.*`` or its string
                              ``"MobileNet_V3_Large_Weights.IMAGENET1K_V1"``;
                              ``"hf-hub:timm/mobilenetv3_large_100.ra_in1k"`` (any timm tag)
``mobilenet_v3("small")``     ``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``MobileNet_V3_Small_Weights.*``;
                              ``"hf-hub:timm/mobilenetv3_small_100.lamb_in1k"``
``ssdlite("large")``          ``"DEFAULT"``, ``"COCO_V1"``, ``SSDLite320_MobileNet_V3_Large_Weights.*``
``lraspp("large")``           ``"DEFAULT"``, ``"COCO_WITH_VOC_LABELS_V1"``,
                              ``LRASPP_MobileNet_V3_Large_Weights.*``
============================  =================================================================

``weights_backbone=`` of ``ssdlite``/``lraspp`` takes the ``mobilenet_v3`` names (the builders
pass it to :func:`mnv3det.mobilenet_v3`). Names are matched case-insensitively.

Downloads go through torchvision's and torch's own API: the enum's ``url`` is fetched once by
``torch.hub.download_url_to_file`` (progress bar, SHA-256 prefix check against the hash in the
file name) into ``torch.hub.get_dir()/checkpoints`` (``~/.cache/torch/hub/checkpoints``, the
cache torchvision uses, so a file torchvision already downloaded is reused); Hugging Face ids
through ``huggingface_hub.hf_hub_download`` into the Hugging Face cache (``pip install
mnv3det[hub]``). Files are then read by :mod:`mnv3det.weights`, the one module that reads
checkpoints; the builders infer what a weight implies from its tensors (torchvision's SSDLite
COCO_V1: 91 classes and the reduced tail; LR-ASPP: 21 classes, full tail, dilated, torchvision's
low tap). The class names of the enum's ``meta["categories"]`` (and, for SSDLite, the label ->
COCO category id map) become the model's ``meta``.

A weight of another builder or arch, or an unknown name, is a :class:`ValueError` naming the
valid names.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch.hub

if TYPE_CHECKING:
    from mnv3det.weights import Checkpoint

__all__ = [
    "FAMILIES",
    "HF_PREFIX",
    "WeightsDownloadError",
    "download",
    "download_hf",
    "resolve_weights",
    "torchvision_enum",
    "weight_names",
]

HF_PREFIX = "hf-hub:"
"""Prefix of Hugging Face Hub ids (timm's spelling: ``hf-hub:timm/<model>.<tag>``)."""
HF_FILES = ("model.safetensors", "pytorch_model.bin")
"""Files looked for in a Hugging Face repository, in this order (timm publishes both)."""
FAMILIES = ("mobilenet_v3", "ssdlite", "lraspp")
"""Builders that take weights by name."""

#: torchvision's weight enums: (family, arch) -> (module, enum class name).
_ENUMS: dict[tuple[str, str], tuple[str, str]] = {
    ("mobilenet_v3", "large"): ("torchvision.models", "MobileNet_V3_Large_Weights"),
    ("mobilenet_v3", "small"): ("torchvision.models", "MobileNet_V3_Small_Weights"),
    ("ssdlite", "large"): (
        "torchvision.models.detection",
        "SSDLite320_MobileNet_V3_Large_Weights",
    ),
    ("lraspp", "large"): (
        "torchvision.models.segmentation",
        "LRASPP_MobileNet_V3_Large_Weights",
    ),
}
_ENUM_STRING = re.compile(r"^(\w+_Weights)\.(\w+)$")
_TIMM_NAME = re.compile(r"^(?P<tf>tf_)?mobilenetv3_(?P<arch>large|small)_")


class WeightsDownloadError(RuntimeError):
    """A named weight could not be downloaded, or the download failed its hash check."""


def torchvision_enum(family: str, arch: str) -> type[Enum] | None:
    """torchvision's weight enum of a builder and arch, or ``None`` when it publishes none.

    Args:
        family: ``"mobilenet_v3"``, ``"ssdlite"`` or ``"lraspp"``.
        arch: ``"large"`` or ``"small"``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown builder {family!r}; expected one of {list(FAMILIES)}")
    spec = _ENUMS.get((family, arch))
    if spec is None:
        return None
    import importlib

    return getattr(importlib.import_module(spec[0]), spec[1])


def weight_names(family: str, arch: str) -> list[str]:
    """Every name ``weights=`` of ``family(arch)`` accepts (short and ``Enum.MEMBER`` spellings).

    Args:
        family: ``"mobilenet_v3"``, ``"ssdlite"`` or ``"lraspp"``.
        arch: ``"large"`` or ``"small"``.

    Returns:
        For example ``["DEFAULT", "COCO_V1", "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"]``;
        the backbone's list ends with the ``hf-hub:timm/...`` form.
    """
    enum = torchvision_enum(family, arch)
    names = [] if enum is None else sorted(enum.__members__, key=lambda n: n != "DEFAULT")
    if enum is not None:
        names += [f"{enum.__name__}.{m.name}" for m in enum]
    if family == "mobilenet_v3":
        names.append(f"{HF_PREFIX}timm/mobilenetv3_{arch}_100.<tag>")
    return names


def resolve_weights(
    weights: Any, family: str, arch: str | None = "large"
) -> str | Path | Mapping | Checkpoint | None:
    """Turn a weight name into a local file; anything else is returned unchanged.

    Args:
        weights: ``None``, a path, a state_dict, a :class:`~mnv3det.weights.Checkpoint`, a
            torchvision weight enum member, its string (``"DEFAULT"``, ``"COCO_V1"``,
            ``"SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"``) or, for the backbone, a
            Hugging Face id ``"hf-hub:<owner>/<repo>[@revision]"``.
        family: the builder: ``"mobilenet_v3"``, ``"ssdlite"`` or ``"lraspp"``.
        arch: the builder's ``arch`` (``None``: ``"large"``, the builders' default).

    Returns:
        The downloaded file's path (backbone weights); for SSDLite/LR-ASPP the file read into a
        :class:`~mnv3det.weights.Checkpoint` whose description holds the weight's
        ``class_names`` (and the SSDLite ``label_map``); ``weights`` itself when it is no name.

    Raises:
        ValueError: an unknown name, or a weight of another builder or arch (names the valid
            ones).
        ImportError: a Hugging Face id without ``huggingface_hub`` installed.
        WeightsDownloadError: the download failed or its hash did not match.
    """
    arch = arch or "large"
    if weights is None or isinstance(weights, (Path, Mapping)):
        return weights
    if isinstance(weights, Enum):
        return _from_enum(weights, family, arch)
    if not isinstance(weights, str):
        return weights  # a Checkpoint, or something the builder will reject
    if weights.startswith(HF_PREFIX):
        if family != "mobilenet_v3":
            raise ValueError(
                f"{_call(family, arch)}: {weights!r} is an ImageNet backbone on the Hugging Face "
                f"Hub; pass it as weights_backbone=. For weights=, {_listing(family, arch)}"
            )
        return download_hf(weights, arch)
    if Path(weights).exists():
        return weights
    match = _ENUM_STRING.match(weights)
    if match:
        return _from_enum(
            _enum_from_string(weights, match[1], match[2], family, arch), family, arch
        )
    if Path(weights).suffix or "/" in weights or "\\" in weights:
        return weights  # a path: mnv3det.weights says it is missing
    enum = torchvision_enum(family, arch)
    members = {} if enum is None else {k.upper(): m for k, m in enum.__members__.items()}
    if weights.upper() in members:
        return _from_enum(members[weights.upper()], family, arch)
    backbone = torchvision_enum("mobilenet_v3", arch)
    backbone_names = set() if backbone is None else set(backbone.__members__) - {"DEFAULT"}
    hint = ""
    if family != "mobilenet_v3" and weights.upper() in backbone_names:
        hint = f" ({weights!r} is a backbone weight: pass it as weights_backbone=)"
    raise ValueError(
        f"{_call(family, arch)}: weights={weights!r} is neither a file nor a known weight "
        f"name{hint}; {_listing(family, arch)}"
    )


def _call(family: str, arch: str) -> str:
    return f"{family}({arch!r})"


def _listing(family: str, arch: str) -> str:
    names = weight_names(family, arch)
    if not names:
        return (
            f"torchvision publishes no {family} weights for arch={arch!r}: pass a checkpoint file"
        )
    return "valid names: " + ", ".join(names) + " (or a checkpoint file)"


def _enum_from_string(text: str, enum_name: str, member: str, family: str, arch: str) -> Enum:
    """A torchvision enum member from ``"Enum.MEMBER"`` (torchvision's ``get_weight``)."""
    from torchvision.models import get_weight

    try:
        return get_weight(text)
    except (ValueError, KeyError, AttributeError) as err:
        known = {name for _, name in _ENUMS.values()}
        what = "member" if enum_name in known else "torchvision weight enum"
        raise ValueError(
            f"{_call(family, arch)}: weights={text!r}: unknown {what} ({err}); "
            f"{_listing(family, arch)}"
        ) from None


def _from_enum(weight: Enum, family: str, arch: str) -> str | Path | Checkpoint:
    """Check a torchvision enum member belongs to ``family(arch)``, then download it."""
    expected = torchvision_enum(family, arch)
    if expected is None or type(weight) is not expected:
        owner = next(
            (
                f"{fam}({a!r})"
                for (fam, a), (_, name) in _ENUMS.items()
                if name == type(weight).__name__
            ),
            None,
        )
        hint = ""
        if owner is not None and owner.startswith("mobilenet_v3") and family != "mobilenet_v3":
            hint = "; ImageNet backbone weights go to weights_backbone="
        elif owner is not None and family == "mobilenet_v3" and not owner.startswith(family):
            hint = f"; whole-model weights go to mnv3det.{owner.split('(')[0]}(weights=...)"
        raise ValueError(
            f"{_call(family, arch)}: weights {type(weight).__name__}.{weight.name} are "
            f"{'for ' + owner if owner else 'not MobileNetV3 weights'}{hint}; "
            f"{_listing(family, arch)}"
        )
    url = getattr(weight, "url", None)
    if not url:
        raise ValueError(f"{type(weight).__name__}.{weight.name} has no download url")
    path = download(url)
    if family == "mobilenet_v3":
        return path
    from mnv3det.weights import read_checkpoint

    ckpt = read_checkpoint(path)
    categories = list(weight.meta.get("categories") or [])
    description = dict(ckpt.description)
    if categories:
        description.setdefault("class_names", categories)
    if family == "ssdlite" and categories:  # torchvision's 91 labels are COCO category ids
        description.setdefault(
            "label_map",
            {i: i for i, name in enumerate(categories) if name not in ("__background__", "N/A")},
        )
    return dataclasses.replace(ckpt, description=description)


def download(url: str, check_hash: bool = True, progress: bool = True) -> Path:
    """Download ``url`` once into torch's cache, as ``torch.hub.load_state_dict_from_url`` does.

    The file keeps the url's name in ``torch.hub.get_dir()/checkpoints``; a file already there
    is used as it is. With ``check_hash`` the hash prefix in the name (``name-<sha256
    prefix>.pth``, torchvision's convention) must match the downloaded bytes, else nothing is
    kept.

    Args:
        url: the file's url (a torchvision enum's ``url``).
        check_hash: verify the SHA-256 prefix in the file name.
        progress: show a progress bar on stderr.

    Returns:
        The cached file.

    Raises:
        WeightsDownloadError: no connection, an HTTP error, or a hash mismatch (names the url
            and where to put the file by hand).
    """
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    filename = Path(urlparse(url).path).name
    path = directory / filename
    if path.is_file():
        return path
    found = torch.hub.HASH_REGEX.search(filename) if check_hash else None
    hash_prefix = found.group(1) if found else None
    sys.stderr.write(f'Downloading: "{url}" to {path}\n')
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix, progress=progress)
    except RuntimeError as err:
        if "invalid hash value" not in str(err):
            raise
        raise WeightsDownloadError(
            f"download of {url} failed its hash check ({err}); nothing was kept in {directory}. "
            "Download again; if it fails again the file is corrupted on the way (proxy?)."
        ) from err
    except (URLError, OSError) as err:
        raise WeightsDownloadError(
            f"could not download {url} ({err}); download it by hand to {path} "
            "or pass the file's path as weights="
        ) from err
    return path


def download_hf(spec: str, arch: str | None = None) -> Path:
    """Download a MobileNetV3 checkpoint from the Hugging Face Hub (timm's ``hf-hub:`` ids).

    ``model.safetensors`` is fetched (``pytorch_model.bin`` when the repository has none) with
    ``huggingface_hub.hf_hub_download``, into the Hugging Face cache (``HF_HOME``), which
    downloads once and checks what it downloads.

    Args:
        spec: ``"hf-hub:<owner>/<repo>"``, optionally ``@<revision>``, e.g.
            ``"hf-hub:timm/mobilenetv3_large_100.ra_in1k"``.
        arch: the backbone's arch; a timm MobileNetV3 of the other arch is refused before
            downloading.

    Returns:
        The cached file.

    Raises:
        ValueError: a malformed id, a timm model of the other arch, or a TensorFlow port
            (``tf_mobilenetv3_*``: "same" padding, which this backbone does not have).
        ImportError: ``huggingface_hub`` is not installed (``pip install mnv3det[hub]``).
        WeightsDownloadError: the repository or revision cannot be reached or has no
            checkpoint.
    """
    repo = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else spec
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(
            f"weights={spec!r}: expected {HF_PREFIX}<owner>/<repo>[@revision], e.g. "
            f"{HF_PREFIX}timm/mobilenetv3_large_100.ra_in1k"
        )
    model = repo.split("/")[1]
    timm_name = _TIMM_NAME.match(model)
    if timm_name and timm_name["tf"]:
        raise ValueError(
            f"weights={spec!r} is a TensorFlow port (timm's tf_mobilenetv3_*: 'same' padding and "
            "BatchNorm eps 1e-3), which this backbone cannot reproduce; use "
            f"{HF_PREFIX}timm/{model[3:].split('.')[0]}.<tag> or torchvision's weights"
        )
    if timm_name and arch is not None and timm_name["arch"] != arch:
        raise ValueError(
            f"weights={spec!r} is a MobileNetV3-{timm_name['arch'].capitalize()} checkpoint; "
            f"build mobilenet_v3({timm_name['arch']!r}) or use "
            f"{HF_PREFIX}timm/mobilenetv3_{arch}_100.<tag>"
        )
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            f"weights={spec!r} needs huggingface_hub: pip install mnv3det[hub] "
            "(or pip install 'huggingface_hub>=0.20')"
        ) from None
    for filename in HF_FILES:
        try:
            return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision or None))
        except Exception as err:
            kinds = {c.__name__ for c in type(err).__mro__}
            if "EntryNotFoundError" in kinds and "LocalEntryNotFoundError" not in kinds:
                continue  # the repository has no such file: try the next one
            if not isinstance(err, OSError):
                raise
            raise WeightsDownloadError(
                f"could not download {filename} of {repo}"
                f"{'@' + revision if revision else ''} from the Hugging Face Hub "
                f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
            ) from err
    raise WeightsDownloadError(
        f"weights={spec!r}: the repository has none of {', '.join(HF_FILES)}"
    )
