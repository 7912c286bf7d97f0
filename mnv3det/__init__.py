"""mnv3det: a MobileNetV3 backbone plugin for detection and segmentation.

Howard et al., "Searching for MobileNetV3", ICCV 2019. The public API is described in the README.
"""

from mnv3det.backbone import FeatureInfo, MobileNetV3Backbone, mobilenet_v3
from mnv3det.fpn import BackboneWithFPN, with_fpn
from mnv3det.weights import CheckpointMismatchError, LoadReport, UnsafeCheckpointError

__all__ = [
    "BackboneWithFPN",
    "CheckpointMismatchError",
    "FeatureInfo",
    "LoadReport",
    "MobileNetV3Backbone",
    "UnsafeCheckpointError",
    "lraspp",
    "mobilenet_v3",
    "ssdlite",
    "with_fpn",
]
__version__ = "0.1.0"

_LAZY = {"ssdlite": "mnv3det.models.ssdlite", "lraspp": "mnv3det.models.lraspp"}


def __getattr__(name: str):  # lazy so that importing the backbone stays cheap
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mnv3det' has no attribute {name!r}")
