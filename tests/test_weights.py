"""Checkpoint loading: torchvision and timm parity at every tap, safe loading, clear errors."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import randomize_bn_stats
from safetensors.torch import save_file

import mnv3det
from mnv3det.weights import CheckpointMismatchError, UnsafeCheckpointError

WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.25)


def _all_taps(arch: str, **kwargs) -> list[str]:
    return [t.name for t in mnv3det.mobilenet_v3(arch, **kwargs).available_taps()]


def _torchvision_taps(tv_features: torch.nn.Sequential, bb, x: torch.Tensor) -> dict:
    """Reference value of every tap of ``bb``, computed by torchvision's own layers."""
    specs = {s.info.name: s for s in bb._taps}
    outputs, expansions = [], {}
    for index, layer in enumerate(tv_features):
        block = getattr(layer, "block", None)
        if block is not None and len(block) > 0 and layer.block[0][0].kernel_size == (1, 1):
            expansions[index] = block[0](x)
        x = layer(x)
        outputs.append(x)
    return {
        name: expansions[s.index] if s.expansion else outputs[s.index] for name, s in specs.items()
    }


@pytest.mark.parametrize(
    ("arch", "width", "reduced_tail", "dilated"),
    list(itertools.product(("large", "small"), WIDTHS, (False, True), (False, True))),
)
def test_torchvision_checkpoint_file_gives_same_features(
    tmp_path: Path, arch: str, width: float, reduced_tail: bool, dilated: bool
) -> None:
    tv = getattr(torchvision.models, f"mobilenet_v3_{arch}")(
        width_mult=width, reduced_tail=reduced_tail, dilated=dilated
    )
    randomize_bn_stats(tv).eval()
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    kwargs = {"width_mult": width, "reduced_tail": reduced_tail, "dilated": dilated}
    with pytest.warns(UserWarning, match=r"unused keys.*classifier\.0\.weight"):
        bb = mnv3det.mobilenet_v3(arch, taps=_all_taps(arch, **kwargs), weights=path, **kwargs)
    bb.eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ours = bb(x)
        ref = _torchvision_taps(tv.features, bb, x)
    assert list(ours) == list(ref)
    for name in ours:
        assert (ours[name] - ref[name]).abs().max().item() < 1e-5, name
    assert bb.weights_report.format == "torchvision"
    assert set(bb.weights_report.unused) == {
        k for k in tv.state_dict() if k.startswith("classifier")
    }


@pytest.mark.parametrize("arch", ["large", "small"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_gives_same_features(tmp_path: Path, arch: str, suffix: str) -> None:
    timm = pytest.importorskip("timm")
    name = f"mobilenetv3_{arch}_100"
    reference = randomize_bn_stats(timm.create_model(name, pretrained=False)).eval()
    state = reference.state_dict()
    path = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)  # wrapped, as timm's train script saves
    features = timm.create_model(name, pretrained=False, features_only=True).eval()
    missing, _ = features.load_state_dict(state, strict=False)
    assert not missing
    with pytest.warns(UserWarning, match="conv_head.weight"):
        bb = mnv3det.mobilenet_v3(arch, weights=path).eval()  # default taps = timm's 5 levels
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ours = list(bb(x).values())
        ref = features(x)
    assert [f.shape[1] for f in ref] == bb.channels
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() < 1e-5
    assert bb.weights_report.format == "timm"


def test_in_memory_state_dict_with_wrapper_and_prefix() -> None:
    tv = randomize_bn_stats(torchvision.models.mobilenet_v3_small()).eval()
    wrapped = {"model": {f"module.{k}": v for k, v in tv.state_dict().items()}}
    with pytest.warns(UserWarning):
        bb = mnv3det.mobilenet_v3("small", taps=["last_conv"], weights=wrapped).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb(x)["last_conv"], tv.features(x), rtol=0, atol=1e-5)


def test_wrong_arch_is_a_clear_error_naming_keys_and_shapes() -> None:
    small = torchvision.models.mobilenet_v3_small().state_dict()
    with pytest.raises(CheckpointMismatchError) as err:
        mnv3det.mobilenet_v3("large", weights=small)
    message = str(err.value)
    assert "mobilenet_v3('large'" in message
    assert "features.1.block.1.0.weight: missing from checkpoint (model (16, 16, 1, 1))" in message
    assert "125 shape mismatches" in message


def test_wrong_width_is_a_clear_error() -> None:
    narrow = torchvision.models.mobilenet_v3_large(width_mult=0.75).state_dict()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"width_mult=1\.0.*features\.2\.block\.0\.0\.weight: checkpoint \(48, 16, 1, 1\) vs model \(64, 16, 1, 1\)",
    ):
        mnv3det.mobilenet_v3("large", weights=narrow)


def test_reduced_tail_mismatch_is_a_clear_error() -> None:
    full = torchvision.models.mobilenet_v3_large().state_dict()
    with pytest.raises(CheckpointMismatchError, match="reduced_tail=True"):
        mnv3det.mobilenet_v3("large", reduced_tail=True, taps=["last_conv"], weights=full)


def test_pruned_model_reports_unused_tail_keys() -> None:
    full = torchvision.models.mobilenet_v3_large().state_dict()
    with pytest.warns(UserWarning, match="unused keys"):
        bb = mnv3det.mobilenet_v3("large", taps=["stage3"], weights=full)
    assert "features.16.0.weight" in bb.weights_report.unused


def test_not_a_mobilenet_checkpoint() -> None:
    resnet = torchvision.models.resnet18().state_dict()
    with pytest.raises(ValueError, match="not a torchvision or timm MobileNetV3"):
        mnv3det.mobilenet_v3("large", weights=resnet)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        mnv3det.mobilenet_v3("large", weights=tmp_path / "nope.pth")


class _RunsCode:
    """An object whose unpickling would create a file (a stand-in for malicious code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_checkpoint_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = dict(torchvision.models.mobilenet_v3_small().state_dict())
    state["payload"] = _RunsCode(str(marker))
    torch.save(state, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*refused"):
        mnv3det.mobilenet_v3("small", weights=path)
    assert not marker.exists()
