"""torch.hub entry points: ``torch.hub.load("/path/to/mnv3det", "ssdlite", source="local", ...)``.

Three entry points, the package's builders with their arguments and weight names (see
:mod:`mnv3det.pretrained`)::

    import torch

    det = torch.hub.load("/path/to/mnv3det", "ssdlite", source="local", weights="DEFAULT")
    seg = torch.hub.load("/path/to/mnv3det", "lraspp", source="local", weights="DEFAULT")
    bb = torch.hub.load("/path/to/mnv3det", "mobilenet_v3", "large", source="local",
                        weights="IMAGENET1K_V1")

The first call with a weight name downloads the file into torch's cache
(``torch.hub.get_dir()/checkpoints``); later calls read it from there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # names imported at run time would show up in torch.hub.list
    from typing import Any

    from torch import nn

dependencies = ["torch", "torchvision"]


def mobilenet_v3(arch: str = "large", **kwargs: Any) -> nn.Module:
    """MobileNetV3 feature extractor (:func:`mnv3det.mobilenet_v3`).

    Args:
        arch: ``"large"`` or ``"small"``.
        **kwargs: :func:`mnv3det.mobilenet_v3`'s arguments, e.g. ``taps``, ``weights``
            (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``"hf-hub:timm/mobilenetv3_large_100.ra_in1k"``,
            a file).

    Returns:
        A :class:`mnv3det.MobileNetV3Backbone`.
    """
    from mnv3det.backbone import mobilenet_v3 as build

    return build(arch, **kwargs)


def ssdlite(arch: str | None = None, **kwargs: Any) -> nn.Module:
    """SSDLite-MobileNetV3 detector (:func:`mnv3det.ssdlite`).

    Args:
        arch: ``"large"`` (default) or ``"small"``.
        **kwargs: :func:`mnv3det.ssdlite`'s arguments, e.g. ``num_classes``, ``weights``
            (``"DEFAULT"``/``"COCO_V1"``: torchvision's COCO detector, or a file),
            ``weights_backbone``.

    Returns:
        An :class:`mnv3det.models.ssdlite.SSDLite`.
    """
    from mnv3det.models.ssdlite import ssdlite as build

    return build(arch, **kwargs)


def lraspp(arch: str | None = None, **kwargs: Any) -> nn.Module:
    """LR-ASPP-MobileNetV3 segmenter (:func:`mnv3det.lraspp`).

    Args:
        arch: ``"large"`` (default) or ``"small"``.
        **kwargs: :func:`mnv3det.lraspp`'s arguments, e.g. ``num_classes``, ``weights``
            (``"DEFAULT"``/``"COCO_WITH_VOC_LABELS_V1"``: torchvision's 21-class model, or a
            file), ``weights_backbone``.

    Returns:
        An :class:`mnv3det.models.lraspp.LRASPP`.
    """
    from mnv3det.models.lraspp import lraspp as build

    return build(arch, **kwargs)
