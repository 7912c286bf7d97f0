"""The backbone table: parameters and MAdds at 224 (paper Tables 1-3) and the taps of each variant."""

from __future__ import annotations

from dataclasses import dataclass

from mnv3det.backbone import (
    classification_head,
    count_madds,
    count_parameters,
    mobilenet_v3,
)

PAPER_MADDS = {"large": 219_000_000, "small": 56_000_000}
VARIANTS: tuple[tuple[str, float, bool], ...] = (
    ("large", 1.0, False),
    ("large", 1.0, True),
    ("large", 0.75, False),
    ("large", 0.5, False),
    ("large", 0.35, False),
    ("large", 1.25, False),
    ("small", 1.0, False),
    ("small", 1.0, True),
    ("small", 0.75, False),
    ("small", 0.5, False),
    ("small", 0.35, False),
    ("small", 1.25, False),
)


@dataclass
class VariantInfo:
    """Size and taps of one MobileNetV3 variant."""

    arch: str
    width_mult: float
    reduced_tail: bool
    params_backbone: int
    params_with_classifier: int
    madds_224: int
    taps: str


def describe_variant(arch: str, width_mult: float = 1.0, reduced_tail: bool = False) -> VariantInfo:
    """Parameters (with torchvision's 1000-class head) and MAdds at 224 of one variant."""
    full = mobilenet_v3(arch, width_mult, reduced_tail)
    taps = full.available_taps(blocks=False)
    blocks = len(full.available_taps()) - len(taps)
    backbone = mobilenet_v3(arch, width_mult, reduced_tail, taps=["last_conv"])
    head = classification_head(taps[-1].channels, backbone.classifier_channels)
    # MAdds: backbone + pooled classifier (two Linear layers on a 1x1 map).
    madds = count_madds(backbone) + sum(
        m.in_features * m.out_features for m in head if hasattr(m, "in_features")
    )
    return VariantInfo(
        arch=arch,
        width_mult=width_mult,
        reduced_tail=reduced_tail,
        params_backbone=count_parameters(backbone),
        params_with_classifier=count_parameters(backbone) + count_parameters(head),
        madds_224=madds,
        taps=" ".join(f"{t.name}:{t.channels}@{t.stride}" for t in taps) + f" block1..{blocks}",
    )


def info_table(variants: tuple[tuple[str, float, bool], ...] = VARIANTS) -> str:
    """Markdown table of every variant: params, MAdds at 224 and taps (name:channels@stride)."""
    lines = [
        "| variant | params (backbone) | params (+ImageNet head) | MAdds@224 | taps name:channels@stride |",
        "|---|---:|---:|---:|---|",
    ]
    for arch, width, tail in variants:
        v = describe_variant(arch, width, tail)
        name = f"{arch} x{width}" + (" reduced_tail" if tail else "")
        lines.append(
            f"| {name} | {v.params_backbone:,} | {v.params_with_classifier:,} | "
            f"{v.madds_224 / 1e6:.1f}M | {v.taps} |"
        )
    return "\n".join(lines)
