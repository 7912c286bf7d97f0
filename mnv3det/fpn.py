"""FPN wrapper so the backbone drops into torchvision's FasterRCNN, RetinaNet and FCOS.

torchvision detectors want ``backbone.out_channels`` (one int) and an OrderedDict of feature
maps with equal channels. :func:`with_fpn` puts torchvision.ops.FeaturePyramidNetwork (Lin et
al., 2017) on the selected taps, as torchvision's own ``BackboneWithFPN`` does for its backbones.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from mnv3det.backbone import MobileNetV3Backbone


class BackboneWithFPN(nn.Module):
    """Backbone taps -> FPN; ``out_channels`` is the FPN width.

    Outputs are keyed ``"0"``, ``"1"``, ... in the order of ``body.feature_info``, followed by
    the extra levels (``"pool"`` or ``"p6"``, ``"p7"``), exactly like torchvision's
    ``BackboneWithFPN``.

    Attributes:
        body: the :class:`MobileNetV3Backbone`.
        fpn: ``torchvision.ops.FeaturePyramidNetwork``.
        out_channels: channels of every output map.
    """

    def __init__(
        self,
        backbone: MobileNetV3Backbone,
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=backbone.channels,
            out_channels=out_channels,
            extra_blocks=extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        # Keys "0", "1", ... (then "pool" or "p6", "p7"), as torchvision's BackboneWithFPN, so
        # the detectors' default MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"]) works.
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats.values())))


def with_fpn(
    backbone: MobileNetV3Backbone,
    out_channels: int = 256,
    extra_blocks: str | ExtraFPNBlock | None = "pool",
    norm_layer: type[nn.Module] | None = None,
) -> BackboneWithFPN:
    """Wrap a backbone with a Feature Pyramid Network for torchvision detectors.

    Args:
        backbone: from :func:`mnv3det.mobilenet_v3`; its ``taps`` become the FPN inputs
            (each tap's channels are read from ``feature_info``).
        out_channels: FPN width (torchvision uses 256).
        extra_blocks: ``"pool"`` (max-pool level, FasterRCNN), ``"p6p7"`` (two strided convs
            on the FPN output, RetinaNet/FCOS), ``None``, or any torchvision ``ExtraFPNBlock``.
        norm_layer: optional norm for the FPN convs (e.g. ``nn.BatchNorm2d``).

    Returns:
        A module with ``out_channels`` returning an OrderedDict of maps.

    With taps ``stage2, stage3, stage4, last_conv`` (strides 4-32) and ``"pool"`` the output
    has the 5 levels that FasterRCNN's default anchor generator expects; with taps
    ``stage3, stage4, last_conv`` and ``"p6p7"`` it has RetinaNet's / FCOS's P3-P7.
    """
    if isinstance(extra_blocks, str):
        if extra_blocks == "pool":
            extra_blocks = LastLevelMaxPool()
        elif extra_blocks == "p6p7":
            extra_blocks = LastLevelP6P7(out_channels, out_channels)
        else:
            raise ValueError(
                f"with_fpn: extra_blocks must be 'pool', 'p6p7', None or an ExtraFPNBlock, "
                f"got {extra_blocks!r}"
            )
    return BackboneWithFPN(backbone, out_channels, extra_blocks, norm_layer)
