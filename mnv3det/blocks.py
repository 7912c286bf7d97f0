"""Building blocks of MobileNetV3 (Howard et al., ICCV 2019, §5.2-5.3 and Fig. 4).

Conv-BN-activation, squeeze-and-excite with a hard-sigmoid gate and the inverted-residual
"bneck" block. Module and parameter names mirror torchvision's ``mobilenetv3.py`` on purpose,
so a torchvision state_dict loads into :class:`mnv3det.backbone.MobileNetV3Backbone` without any
key renaming (``features.N.block.M...``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

NormLayer = Callable[[int], nn.Module]

ACTIVATIONS: dict[str, type[nn.Module]] = {"RE": nn.ReLU, "HS": nn.Hardswish}


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (paper §5.2, as in the TF reference).

    Rounding never goes below 90% of ``value``; this is the rule torchvision and timm use, so
    channel counts (and therefore checkpoints) agree for every width multiplier.
    """
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


@dataclass(frozen=True)
class BlockConfig:
    """One row of the paper's Table 1/2, after width scaling.

    Attributes:
        in_channels: input channels of the block.
        kernel: depthwise kernel size.
        expanded: channels after the 1x1 expansion ("exp size").
        out_channels: output channels ("#out").
        use_se: whether the block has squeeze-and-excite.
        activation: "RE" (ReLU) or "HS" (h-swish).
        stride: depthwise stride (1 when the block is dilated instead).
        dilation: depthwise dilation.
    """

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    activation: str
    stride: int
    dilation: int = 1


class InvertedResidual(nn.Module):
    """MobileNetV3 bneck: [1x1 expand] -> depthwise kxk -> [SE] -> 1x1 project (+ residual).

    The expansion conv is omitted when ``expanded == in_channels`` (the first Large block);
    the residual is used only at stride 1 with equal input/output channels (paper Fig. 4).
    """

    def __init__(self, cfg: BlockConfig, norm_layer: NormLayer) -> None:
        super().__init__()
        if cfg.stride not in (1, 2):
            raise ValueError(f"InvertedResidual: stride must be 1 or 2, got {cfg.stride}")
        self.cfg = cfg
        self.use_res_connect = cfg.stride == 1 and cfg.in_channels == cfg.out_channels
        act = ACTIVATIONS[cfg.activation]
        layers: list[nn.Module] = []
        self.has_expansion = cfg.expanded != cfg.in_channels
        if self.has_expansion:
            layers.append(
                Conv2dNormActivation(
                    cfg.in_channels, cfg.expanded, 1, norm_layer=norm_layer, activation_layer=act
                )
            )
        stride = 1 if cfg.dilation > 1 else cfg.stride
        layers.append(
            Conv2dNormActivation(
                cfg.expanded,
                cfg.expanded,
                cfg.kernel,
                stride=stride,
                dilation=cfg.dilation,
                groups=cfg.expanded,
                norm_layer=norm_layer,
                activation_layer=act,
            )
        )
        if cfg.use_se:
            squeeze = make_divisible(cfg.expanded // 4, 8)
            layers.append(SqueezeExcitation(cfg.expanded, squeeze, scale_activation=nn.Hardsigmoid))
        layers.append(
            Conv2dNormActivation(
                cfg.expanded, cfg.out_channels, 1, norm_layer=norm_layer, activation_layer=None
            )
        )
        self.block = nn.Sequential(*layers)
        self.out_channels = cfg.out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out += x  # in place, as torchvision: saves one allocation per residual block
        return out

    def forward_with_expansion(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run the block and also return the expansion-layer output (the SSDLite C4 tap).

        Returns:
            ``(output, expansion)``; when the block has no expansion conv the expansion
            output is the block input itself.
        """
        expanded = self.block[0](x) if self.has_expansion else x
        rest = self.block[1:] if self.has_expansion else self.block
        out = rest(expanded)
        if self.use_res_connect:
            out += x
        return out, expanded


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int,
    norm_layer: NormLayer,
    activation: type[nn.Module] | None = nn.Hardswish,
) -> Conv2dNormActivation:
    """The stem and last 1x1 conv of the network (conv without bias, norm, activation)."""
    return Conv2dNormActivation(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        norm_layer=norm_layer,
        activation_layer=activation,
    )


def is_batch_norm(module: nn.Module) -> bool:
    """True for any BatchNorm flavour (BatchNorm2d, SyncBatchNorm, FrozenBatchNorm2d)."""
    from torchvision.ops import FrozenBatchNorm2d

    return isinstance(module, nn.modules.batchnorm._BatchNorm | FrozenBatchNorm2d)


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d/SyncBatchNorm in ``module`` by torchvision's FrozenBatchNorm2d.

    The running statistics, affine parameters and ``eps`` are copied, so outputs in eval mode
    are unchanged; the frozen layers have no trainable parameters and ignore ``train()``.
    """
    from torchvision.ops import FrozenBatchNorm2d

    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = freeze_batch_norm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
