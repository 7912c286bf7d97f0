"""Feature-extracting MobileNetV3 with named multi-stride taps (paper §5, Tables 1-2; §6.3-6.4).

The network is built from the paper's Large and Small tables with torchvision's conventions
(width multiplier with 8-channel rounding, "reduced tail" = paper's RF2 / "†", dilated last
stage for output stride 16). Layers are held in ``self.features`` exactly like torchvision's
``MobileNetV3.features``, so checkpoints map one-to-one.

Taps (see :meth:`MobileNetV3Backbone.available_taps`):

* ``stage1`` .. ``stage5``: the last block output at strides 2, 4, 8, 16, 32.
* ``last_conv``: the final 1x1 conv (960 ch for Large) at stride 32; timm's deepest feature,
  SSDLite's C5 and LR-ASPP's high-resolution branch input.
* ``stage{k}_expand``: the expansion-layer output of the first (strided) block of stage k,
  still at the previous stride. ``stage5_expand`` is the paper's SSDLite C4 (§6.3): 672 ch
  (Large) / 288 ch (Small) at stride 16.
* ``block{i}``: the output of the i-th bneck (inverted-residual) block, ``i`` = 1 .. 15 (Large)
  / 1 .. 11 (Small), counted from 1 like the rows of the paper's tables; it is
  ``features[i]`` of torchvision's ``MobileNetV3`` (``features[0]`` is the stem). An integer
  ``i`` in ``taps`` means ``block{i}``. A stage tap is the block tap of the stage's last block
  under another name (Large: ``stage3`` = ``block6``); ``block4`` of Large is the first
  stride-8 block, torchvision's LR-ASPP low tap.

With ``dilated=True`` the last stage keeps stride 16 and uses dilation 2 (§6.4), so ``stage5``,
the blocks of stage 5 and ``last_conv`` report stride 16.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mnv3det.blocks import (
    BlockConfig,
    InvertedResidual,
    NormLayer,
    conv_bn_act,
    freeze_batch_norm,
    is_batch_norm,
    make_divisible,
)
from mnv3det.pretrained import resolve_weights
from mnv3det.weights import load_backbone_weights

# (kernel, expanded, out, use_se, activation, stride) per row of the paper's Table 1 / Table 2.
LARGE_ROWS: tuple[tuple[int, int, int, bool, str, int], ...] = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)
SMALL_ROWS: tuple[tuple[int, int, int, bool, str, int], ...] = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)
ARCHS: dict[str, dict[str, Any]] = {
    "large": {"rows": LARGE_ROWS, "stem": 16, "classifier": 1280},
    "small": {"rows": SMALL_ROWS, "stem": 16, "classifier": 1024},
}
SUPPORTED_WIDTHS_NOTE = "any positive float; published widths are 0.35, 0.5, 0.75, 1.0, 1.25"


def default_norm_layer() -> NormLayer:
    """torchvision's MobileNetV3 BatchNorm: eps 0.001, momentum 0.01."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class FeatureInfo(NamedTuple):
    """Describes one tap: its name, number of channels and stride w.r.t. the input."""

    name: str
    channels: int
    stride: int


class _TapSpec(NamedTuple):
    info: FeatureInfo
    index: int  # index into ``features``
    expansion: bool  # tap the expansion output of that block instead of its output


def block_stages(arch: str) -> list[int]:
    """Stage (1..5) of every bneck block, ``block1`` first.

    Stage k is the run of blocks whose nominal output stride (without dilation) is ``2**k``;
    a stage starts with its strided block.

    Example:
        >>> block_stages("large")
        [1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 5, 5, 5]
    """
    if arch not in ARCHS:
        raise ValueError(f"mobilenet_v3: arch must be one of {sorted(ARCHS)}, got {arch!r}")
    stages, nominal = [], 2  # the stem has stride 2
    for row in ARCHS[arch]["rows"]:
        nominal *= row[5]
        stages.append(nominal.bit_length() - 1)
    return stages


def checkpoint_has_reduced_tail(state: Mapping[str, Tensor], arch: str, width_mult: float) -> bool:
    """Whether a checkpoint was trained with the reduced tail (RF2).

    Looks among the tensor shapes for the reduced-tail projection of the first stride-32 block
    and the reduced-tail last 1x1 conv (Large x1.0: ``(80, 672, 1, 1)`` and ``(480, 80, 1, 1)``;
    a full tail has neither), so it works for torchvision's keys, ours and Lightning
    checkpoints alike, for detectors and segmenters.
    """
    _, blocks, last_conv, _ = block_configs(arch, width_mult, reduced_tail=True)
    first_tail = next(b for b in reversed(blocks) if b.stride == 2)
    wanted = {
        (first_tail.out_channels, first_tail.expanded, 1, 1),
        (last_conv, blocks[-1].out_channels, 1, 1),
    }
    return wanted <= {tuple(v.shape) for v in state.values()}


def block_tap(index: int) -> str:
    """Name of the tap at the output of bneck block ``index`` (1-based): ``"block{index}"``."""
    return f"block{index}"


def block_configs(
    arch: str, width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False
) -> tuple[int, list[BlockConfig], int, int]:
    """Width-scaled block configs of a MobileNetV3 variant.

    Args:
        arch: "large" or "small".
        width_mult: channel multiplier (paper §5, Table 3 uses 0.35-1.25).
        reduced_tail: halve the last stage's widths (paper's RF2 / "†"; the first stride-32 block
            keeps its expansion width, as in the paper and torchvision).
        dilated: replace the last stride 2 by dilation 2 (output stride 16).

    Returns:
        ``(stem_channels, blocks, last_conv_channels, classifier_channels)``.
    """
    if arch not in ARCHS:
        raise ValueError(f"mobilenet_v3: arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if not width_mult > 0:
        raise ValueError(f"mobilenet_v3: width_mult must be > 0 ({SUPPORTED_WIDTHS_NOTE})")
    spec = ARCHS[arch]
    rows = spec["rows"]
    last_stage_start = max(i for i, row in enumerate(rows) if row[5] == 2)
    divider = 2 if reduced_tail else 1

    def scale(channels: int) -> int:
        return make_divisible(channels * width_mult, 8)

    blocks: list[BlockConfig] = []
    in_channels = scale(spec["stem"])
    for i, (kernel, expanded, out, use_se, act, stride) in enumerate(rows):
        in_tail = i >= last_stage_start
        if in_tail:
            out //= divider
            if i > last_stage_start:
                expanded //= divider
        cfg = BlockConfig(
            in_channels=in_channels,
            kernel=kernel,
            expanded=scale(expanded),
            out_channels=scale(out),
            use_se=use_se,
            activation=act,
            stride=stride,
            dilation=2 if (dilated and in_tail) else 1,
        )
        blocks.append(cfg)
        in_channels = cfg.out_channels
    last_conv = 6 * in_channels
    classifier = scale(spec["classifier"] // divider)
    return scale(spec["stem"]), blocks, last_conv, classifier


def _tap_specs(arch: str, width_mult: float, reduced_tail: bool, dilated: bool) -> list[_TapSpec]:
    """Every tap of a variant, in execution order (an expansion before its block's output)."""
    stem, configs, last_conv, _ = block_configs(arch, width_mult, reduced_tail, dilated)
    specs: list[_TapSpec] = []
    stride = 2
    stage_end: dict[int, tuple[int, int, int]] = {1: (0, stem, 2)}
    for index, (cfg, stage) in enumerate(zip(configs, block_stages(arch)), start=1):
        if cfg.stride == 2:  # the first block of ``stage``: its expansion is at the old stride
            if cfg.expanded != cfg.in_channels:
                name = f"stage{stage}_expand"
                specs.append(_TapSpec(FeatureInfo(name, cfg.expanded, stride), index, True))
            stride *= 1 if cfg.dilation > 1 else 2
        info = FeatureInfo(block_tap(index), cfg.out_channels, stride)
        specs.append(_TapSpec(info, index, False))
        stage_end[stage] = (index, cfg.out_channels, stride)
    for stage, (index, channels, tap_stride) in stage_end.items():
        specs.append(_TapSpec(FeatureInfo(f"stage{stage}", channels, tap_stride), index, False))
    specs.append(_TapSpec(FeatureInfo("last_conv", last_conv, stride), len(configs) + 1, False))
    # Stable sort: at one index ``block{i}`` comes before the stage tap naming the same output.
    specs.sort(key=lambda s: (s.index, not s.expansion))
    return specs


def tap_info(
    arch: str = "large", width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False
) -> list[FeatureInfo]:
    """Every tap of a variant with channels and stride, without building it.

    The same list as :meth:`MobileNetV3Backbone.available_taps` of
    ``mobilenet_v3(arch, width_mult, reduced_tail, dilated)``.
    """
    return [spec.info for spec in _tap_specs(arch, width_mult, reduced_tail, dilated)]


class MobileNetV3Backbone(nn.Module):
    """MobileNetV3 feature extractor returning an OrderedDict of named taps in stride order.

    Build it with :func:`mnv3det.mobilenet_v3`. Layers past the deepest selected tap are not
    kept, so nothing is computed (or trained) past it.
    """

    def __init__(
        self,
        arch: str = "large",
        width_mult: float = 1.0,
        reduced_tail: bool = False,
        dilated: bool = False,
        taps: Sequence[str | int] | None = None,
        weights: str | Path | Mapping[str, Tensor] | None = None,
        norm_layer: NormLayer | None = None,
        frozen_stages: int = 0,
        norm_eval: bool = False,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.width_mult = width_mult
        self.reduced_tail = reduced_tail
        self.dilated = dilated
        norm_layer = norm_layer or default_norm_layer()
        stem, configs, last_conv, classifier = block_configs(
            arch, width_mult, reduced_tail, dilated
        )
        self.classifier_channels = classifier
        layers: list[nn.Module] = [conv_bn_act(3, stem, 3, 2, norm_layer)]
        layers += [InvertedResidual(cfg, norm_layer) for cfg in configs]
        layers.append(conv_bn_act(configs[-1].out_channels, last_conv, 1, 1, norm_layer))
        self.features = nn.Sequential(*layers)
        self._all_taps = _tap_specs(arch, width_mult, reduced_tail, dilated)
        stages = block_stages(arch)
        self.stage_of_layer = [1, *stages, stages[-1]]  # stem, blocks, last conv

        selected = [
            block_tap(t) if isinstance(t, int) else t
            for t in (taps if taps is not None else self.default_taps())
        ]
        by_name = {spec.info.name: spec for spec in self._all_taps}
        unknown = [name for name in selected if name not in by_name]
        if unknown or not selected:
            named = [name for name in by_name if not name.startswith("block")]
            raise ValueError(
                f"mobilenet_v3: unknown tap(s) {unknown or selected!r}; valid taps for "
                f"{arch!r}: {', '.join(named)}, block1 .. {block_tap(len(configs))} "
                "(or the block index as an int)"
            )
        if len(set(selected)) != len(selected):
            raise ValueError(f"mobilenet_v3: taps contains duplicates: {selected}")
        order = [spec.info.name for spec in self._all_taps]
        self._taps = sorted((by_name[n] for n in selected), key=lambda s: order.index(s.info.name))

        # Drop everything past the deepest tap: not computed, not trained, not in state_dict.
        # (Checkpoint keys of dropped layers are then reported as unused by the loader.)
        deepest = max(spec.index for spec in self._taps)
        self.features = self.features[: deepest + 1]
        self.weights_report = None
        if weights is not None:
            self.weights_report = load_backbone_weights(self, weights)

        if frozen_bn:
            freeze_batch_norm(self)
        if not 0 <= frozen_stages <= 5:
            raise ValueError(f"mobilenet_v3: frozen_stages must be in 0..5, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        for index, layer in enumerate(self.features):
            if self.stage_of_layer[index] <= frozen_stages:
                layer.requires_grad_(False)

    # ------------------------------------------------------------------ taps
    @staticmethod
    def default_taps() -> tuple[str, ...]:
        """One tap per stride, deepest first-class feature at each (timm's ``features_only``)."""
        return ("stage1", "stage2", "stage3", "stage4", "last_conv")

    def available_taps(self, blocks: bool = True) -> list[FeatureInfo]:
        """Every tap this variant offers, in execution (= stride) order.

        Args:
            blocks: include the per-block taps ``block1`` .. ``blockN``; ``False`` lists only
                the stage-level taps (``stage{k}``, ``stage{k}_expand``, ``last_conv``).
        """
        return [
            spec.info for spec in self._all_taps if blocks or not spec.info.name.startswith("block")
        ]

    @property
    def feature_info(self) -> list[FeatureInfo]:
        """The selected taps, in the order :meth:`forward` returns them."""
        return [spec.info for spec in self._taps]

    @property
    def channels(self) -> list[int]:
        """Channels of the selected taps (timm's ``feature_info.channels()``)."""
        return [spec.info.channels for spec in self._taps]

    @property
    def strides(self) -> list[int]:
        """Strides of the selected taps (timm's ``feature_info.reduction()``)."""
        return [spec.info.stride for spec in self._taps]

    # --------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Compute the selected taps.

        Args:
            x: images, shape ``(N, 3, H, W)``, normalised as the weights expect.

        Returns:
            OrderedDict from tap name to feature map, in stride order.
        """
        out: OrderedDict[str, Tensor] = OrderedDict()
        wanted: dict[int, list[_TapSpec]] = {}
        for spec in self._taps:
            wanted.setdefault(spec.index, []).append(spec)
        for index, layer in enumerate(self.features):
            specs = wanted.get(index, ())
            if any(spec.expansion for spec in specs):
                x, expanded = layer.forward_with_expansion(x)
            else:
                x = layer(x)
            for spec in specs:
                out[spec.info.name] = expanded if spec.expansion else x
        return out

    # ----------------------------------------------------------------- train
    def train(self, mode: bool = True) -> MobileNetV3Backbone:
        """Set train mode; frozen stages and (with ``norm_eval``) every BatchNorm stay in eval."""
        super().train(mode)
        if mode:
            for index, layer in enumerate(self.features):
                if self.stage_of_layer[index] <= self.frozen_stages:
                    layer.eval()
            if self.norm_eval:
                for module in self.modules():
                    if is_batch_norm(module):
                        module.eval()
        return self

    def extra_repr(self) -> str:
        taps = ", ".join(f"{f.name}:{f.channels}@{f.stride}" for f in self.feature_info)
        return (
            f"arch={self.arch!r}, width_mult={self.width_mult}, reduced_tail={self.reduced_tail}, "
            f"dilated={self.dilated}, taps=[{taps}]"
        )


def classification_head(in_channels: int, hidden: int, num_classes: int = 1000) -> nn.Sequential:
    """torchvision's MobileNetV3 classifier (pool omitted): Linear -> h-swish -> Dropout -> Linear.

    Used for parameter counts and for users who want the ImageNet head back.
    """
    return nn.Sequential(
        nn.Linear(in_channels, hidden),
        nn.Hardswish(inplace=True),
        nn.Dropout(p=0.2, inplace=True),
        nn.Linear(hidden, num_classes),
    )


def mobilenet_v3(
    arch: str = "large",
    width_mult: float = 1.0,
    reduced_tail: bool = False,
    dilated: bool = False,
    taps: Sequence[str | int] | None = None,
    weights: str | Path | Mapping[str, Tensor] | Enum | None = None,
    *,
    norm_layer: NormLayer | None = None,
    frozen_stages: int = 0,
    norm_eval: bool = False,
    frozen_bn: bool = False,
) -> MobileNetV3Backbone:
    """Build a feature-extracting MobileNetV3.

    Args:
        arch: "large" or "small" (paper Tables 1 and 2).
        width_mult: channel multiplier; 0.35, 0.5, 0.75, 1.0 and 1.25 are the published ones.
        reduced_tail: halve the last stage (paper's RF2 / "†"), as used by SSDLite/LR-ASPP.
        dilated: last stage dilated instead of strided (output stride 16, paper §6.4).
        taps: names from :meth:`MobileNetV3Backbone.available_taps` (``stage{k}``,
            ``stage{k}_expand``, ``last_conv``, ``block{i}``), or an int ``i`` for ``block{i}``;
            default ``("stage1", "stage2", "stage3", "stage4", "last_conv")``.
        weights: a torchvision or timm MobileNetV3 checkpoint (path to ``.pth``/``.pt``/
            ``.safetensors``) or an in-memory state_dict (see :mod:`mnv3det.weights`), or a
            name, downloaded once (see :mod:`mnv3det.pretrained`): ``"DEFAULT"``,
            ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"`` (Large), torchvision's
            ``MobileNet_V3_{Large,Small}_Weights`` member or its string, or timm's
            ``"hf-hub:timm/mobilenetv3_large_100.ra_in1k"``.
        norm_layer: callable ``channels -> module`` replacing BatchNorm (e.g.
            ``partial(nn.GroupNorm, 8)`` or ``nn.SyncBatchNorm``). Default: BatchNorm2d with
            torchvision's eps 0.001 and momentum 0.01.
        frozen_stages: freeze (no gradients, eval mode) stages 1..N; 0 freezes nothing.
        norm_eval: keep every BatchNorm in eval mode during training (small-batch fine-tuning).
        frozen_bn: replace BatchNorm by torchvision's FrozenBatchNorm2d after loading weights.

    Returns:
        A :class:`MobileNetV3Backbone`; calling it returns an OrderedDict of the taps.

    Example:
        >>> bb = mobilenet_v3("large", taps=["stage3", "stage5_expand", "last_conv"])
        >>> [(f.name, f.channels, f.stride) for f in bb.feature_info]
        [('stage3', 40, 8), ('stage5_expand', 672, 16), ('last_conv', 960, 32)]
        >>> [(f.name, f.channels, f.stride) for f in mobilenet_v3(taps=[4, "block7"]).feature_info]
        [('block4', 40, 8), ('block7', 80, 16)]
    """
    return MobileNetV3Backbone(
        arch,
        width_mult=width_mult,
        reduced_tail=reduced_tail,
        dilated=dilated,
        taps=taps,
        weights=resolve_weights(weights, "mobilenet_v3", arch),
        norm_layer=norm_layer,
        frozen_stages=frozen_stages,
        norm_eval=norm_eval,
        frozen_bn=frozen_bn,
    )


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_madds(module: nn.Module, size: int = 224) -> int:
    """Multiply-adds of one forward pass at ``size x size`` (conv and linear layers).

    Uses ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 x MAdds), the same convention
    as the paper's MAdds and torchvision's "GFLOPS" column.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        module(torch.zeros(1, 3, size, size))
    module.train(was_training)
    return counter.get_total_flops() // 2
