"""Weights by name (mnv3det.pretrained): name -> file in a cache -> keys mapped -> same outputs.

There is no network here: ``torch.hub.download_url_to_file`` (or, for the hash check, the
``urlopen`` it calls) and ``huggingface_hub.hf_hub_download`` are replaced by functions that
serve a torchvision / timm model with random weights and random BatchNorm statistics, saved the
way the published file is (a ``state_dict`` ``.pth``; timm: ``model.safetensors``). Outputs are
compared with the parity tests' tolerances (features 1e-5, LR-ASPP logits 1e-4, detections as
in ``test_ssdlite_parity``).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.hub
import torchvision
from conftest import randomize_bn_stats
from test_lraspp_parity import tv_input
from test_ssdlite_parity import _assert_same, _images
from torchvision.models import MobileNet_V3_Large_Weights, MobileNet_V3_Small_Weights
from torchvision.models.detection import (
    SSDLite320_MobileNet_V3_Large_Weights,
    ssdlite320_mobilenet_v3_large,
)
from torchvision.models.segmentation import (
    LRASPP_MobileNet_V3_Large_Weights,
    lraspp_mobilenet_v3_large,
)

import mnv3det
from mnv3det.models.ssdlite import SSDLite
from mnv3det.pretrained import WeightsDownloadError, download, resolve_weights, weight_names
from mnv3det.testing import randomize_weights
from mnv3det.weights import CheckpointMismatchError, CheckpointNotFoundError

REPO = Path(__file__).resolve().parents[1]
SSDLITE_URL = SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.url
LRASPP_URL = LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.url


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub directory; returns its ``checkpoints`` folder."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Callable[[str, Path], list]:
    """Replace torch.hub's download: ``serve(url, file)`` makes ``url`` deliver ``file``.

    Returns the list of ``(url, hash_prefix, progress)`` of every download made.
    """
    files: dict[str, Path] = {}
    calls: list[tuple[str, str | None, bool]] = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress=True):
        calls.append((url, hash_prefix, progress))
        if url not in files:
            raise AssertionError(f"unexpected download of {url}")
        shutil.copyfile(files[url], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)

    def register(url: str, file: Path) -> list:
        files[url] = file
        return calls

    return register


def _saved(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def test_ssdlite_default_is_torchvisions_coco_detector(serve, cache: Path, tmp_path: Path):
    tv = randomize_weights(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None))
    tv.eval()
    calls = serve(SSDLITE_URL, _saved(tv, tmp_path / "published" / "ssdlite.pth"))
    ours = mnv3det.ssdlite("large", weights="DEFAULT").eval()  # nothing else given
    assert calls == [(SSDLITE_URL, "a79551df", True)]  # hash prefix from the file name
    assert (cache / "ssdlite320_mobilenet_v3_large_coco-a79551df.pth").is_file()
    assert ours.backbone.reduced_tail and ours.num_classes == 91 and ours.size == (320, 320)
    assert ours.weights_report.format == "torchvision" and not ours.weights_report.unused
    categories = SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"]
    assert ours.description["class_names"] == categories
    assert ours.description["label_map"][1] == 1 and 12 not in ours.description["label_map"]
    images = _images([(320, 320), (240, 400)])
    with torch.no_grad():
        _assert_same(tv(images), ours(images))
    # every spelling of the same weight reads the cached file: no second download
    for spelling in (
        SSDLite320_MobileNet_V3_Large_Weights.COCO_V1,
        "COCO_V1",
        "coco_v1",
        "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1",
    ):
        assert mnv3det.ssdlite(weights=spelling).backbone.reduced_tail
    assert len(calls) == 1


def test_lraspp_default_is_torchvisions_voc_segmenter(serve, tmp_path: Path):
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    randomize_bn_stats(tv, seed=1).eval()
    calls = serve(LRASPP_URL, _saved(tv, tmp_path / "published" / "lraspp.pth"))
    ours = mnv3det.lraspp("large", weights=LRASPP_MobileNet_V3_Large_Weights.DEFAULT).eval()
    assert [c[:2] for c in calls] == [(LRASPP_URL, "d234d4ea")]
    assert ours.num_classes == 21 and not ours.backbone.reduced_tail and ours.dilated
    assert ours.low_tap == "stage3_first"
    assert ours.description["class_names"][:2] == ["__background__", "aeroplane"]
    x = torch.rand(2, 3, 97, 131)
    with torch.no_grad():
        expected = tv(tv_input(x))["out"]
        got = ours(x)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() < 1e-4
    same = mnv3det.lraspp(weights="LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1")
    assert same.num_classes == 21 and len(calls) == 1


@pytest.mark.parametrize(
    ("arch", "name", "weight"),
    [
        ("large", "DEFAULT", MobileNet_V3_Large_Weights.IMAGENET1K_V2),
        ("large", "IMAGENET1K_V1", MobileNet_V3_Large_Weights.IMAGENET1K_V1),
        ("large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", None),
        ("small", MobileNet_V3_Small_Weights.DEFAULT, MobileNet_V3_Small_Weights.IMAGENET1K_V1),
    ],
)
def test_backbone_imagenet_names_give_torchvision_features(
    serve, tmp_path: Path, arch: str, name, weight
):
    weight = weight or MobileNet_V3_Large_Weights.IMAGENET1K_V2
    tv = randomize_bn_stats(getattr(torchvision.models, f"mobilenet_v3_{arch}")()).eval()
    calls = serve(weight.url, _saved(tv, tmp_path / "published" / "mnv3.pth"))
    with pytest.warns(UserWarning, match="classifier"):
        bb = mnv3det.mobilenet_v3(arch, taps=["last_conv"], weights=name).eval()
    assert [c[0] for c in calls] == [weight.url]
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        assert (bb(x)["last_conv"] - tv.features(x)).abs().max() < 1e-5


def test_weights_backbone_names(serve, tmp_path: Path):
    tv = randomize_bn_stats(torchvision.models.mobilenet_v3_large()).eval()
    calls = serve(
        MobileNet_V3_Large_Weights.IMAGENET1K_V1.url, _saved(tv, tmp_path / "p" / "mnv3.pth")
    )
    x = torch.randn(1, 3, 96, 64)
    with pytest.warns(UserWarning, match="classifier"):
        det = mnv3det.ssdlite("large", num_classes=5, weights_backbone="IMAGENET1K_V1").eval()
    with pytest.warns(UserWarning, match="classifier"):
        seg = mnv3det.lraspp(
            "large", reduced_tail=False, dilated=False, weights_backbone="IMAGENET1K_V1"
        ).eval()
    with torch.no_grad():
        expected = tv.features(x)
        assert (det.backbone(x)["last_conv"] - expected).abs().max() < 1e-5
        assert (seg.backbone(x)["last_conv"] - expected).abs().max() < 1e-5
    assert len(calls) == 1
    # LR-ASPP's default is the paper's reduced tail; torchvision's ImageNet weights have the full one
    with pytest.raises(CheckpointMismatchError, match="reduced_tail=True"):
        mnv3det.lraspp("large", weights_backbone="IMAGENET1K_V1")
    # with whole-model weights the backbone weights are not needed (not downloaded either)
    tv_det = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    serve(SSDLITE_URL, _saved(tv_det, tmp_path / "p" / "ssdlite.pth"))
    mnv3det.ssdlite(weights="DEFAULT", weights_backbone="IMAGENET1K_V2")
    assert [c[0] for c in calls] == [MobileNet_V3_Large_Weights.IMAGENET1K_V1.url, SSDLITE_URL]


@pytest.fixture
def hf_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Replace ``huggingface_hub.hf_hub_download``; ``hf_hub.files[(repo, name)] = path``."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import EntryNotFoundError

    hub = SimpleNamespace(files={}, calls=[])

    def fake(repo_id: str, filename: str, *, revision: str | None = None, **kwargs) -> str:
        hub.calls.append((repo_id, filename, revision))
        if (repo_id, filename) not in hub.files:
            raise EntryNotFoundError(f"404: {filename} not in {repo_id}")
        return str(hub.files[(repo_id, filename)])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return hub


@pytest.mark.parametrize("arch", ["large", "small"])
def test_timm_hf_hub_ids_give_timm_features(hf_hub, tmp_path: Path, arch: str):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    name = f"mobilenetv3_{arch}_100"
    reference = randomize_bn_stats(timm.create_model(name, pretrained=False)).eval()
    path = tmp_path / "hf" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    tag = "ra_in1k" if arch == "large" else "lamb_in1k"
    hf_hub.files[(f"timm/{name}.{tag}", "model.safetensors")] = path
    features = timm.create_model(name, pretrained=False, features_only=True).eval()
    features.load_state_dict(reference.state_dict(), strict=False)
    with pytest.warns(UserWarning, match="conv_head.weight"):
        bb = mnv3det.mobilenet_v3(arch, weights=f"hf-hub:timm/{name}.{tag}").eval()
    assert hf_hub.calls == [(f"timm/{name}.{tag}", "model.safetensors", None)]
    assert bb.weights_report.format == "timm"
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        for ours, ref in zip(bb(x).values(), features(x), strict=True):
            assert (ours - ref).abs().max() < 1e-5


def test_hf_hub_revision_fallback_file_and_weights_backbone(hf_hub, tmp_path: Path):
    tv = torchvision.models.mobilenet_v3_large()  # a repository holding only a .bin
    path = _saved(tv, tmp_path / "hf" / "pytorch_model.bin")
    hf_hub.files[("me/mnv3", "pytorch_model.bin")] = path
    with pytest.warns(UserWarning, match="classifier"):
        det = mnv3det.ssdlite("large", num_classes=3, weights_backbone="hf-hub:me/mnv3@v2")
    assert det.backbone.weights_report.format == "torchvision"
    assert hf_hub.calls == [
        ("me/mnv3", "model.safetensors", "v2"),
        ("me/mnv3", "pytorch_model.bin", "v2"),
    ]
    with pytest.raises(WeightsDownloadError, match=r"none of model\.safetensors"):
        mnv3det.mobilenet_v3("large", weights="hf-hub:me/empty")


def test_hf_hub_without_huggingface_hub_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install mnv3det\[hub\]"):
        mnv3det.mobilenet_v3("large", weights="hf-hub:timm/mobilenetv3_large_100.ra_in1k")


def _serve_bytes(monkeypatch: pytest.MonkeyPatch, file: Path) -> list[str]:
    """Let torch.hub's real download_url_to_file read ``file`` for any url (hash check on)."""
    opened: list[str] = []

    def fake_urlopen(request, *args, **kwargs):
        opened.append(request.full_url)
        return urllib.request.urlopen(file.as_uri())

    monkeypatch.setattr(torch.hub, "urlopen", fake_urlopen)
    return opened


def test_hash_check_refuses_a_wrong_file_and_keeps_a_right_one(
    monkeypatch: pytest.MonkeyPatch, cache: Path, tmp_path: Path
):
    fake = _saved(torchvision.models.mobilenet_v3_small(), tmp_path / "served.pth")
    opened = _serve_bytes(monkeypatch, fake)
    # torchvision's url names the published file's hash (a79551df): these bytes do not match
    with pytest.raises(WeightsDownloadError, match=r"hash check.*a79551df"):
        mnv3det.ssdlite(weights="DEFAULT")
    assert opened == [SSDLITE_URL]
    assert not any(cache.iterdir())  # nothing kept, not even a partial file
    # a name carrying the right prefix is accepted, cached, and not downloaded again
    prefix = hashlib.sha256(fake.read_bytes()).hexdigest()[:8]
    url = f"https://example.org/models/mnv3s-{prefix}.pth"
    assert download(url) == cache / f"mnv3s-{prefix}.pth"
    assert download(url) == cache / f"mnv3s-{prefix}.pth"
    assert opened == [SSDLITE_URL, url]
    with pytest.warns(UserWarning, match="classifier"):
        mnv3det.mobilenet_v3("small", weights=cache / f"mnv3s-{prefix}.pth")


def test_no_connection_says_where_to_put_the_file(monkeypatch: pytest.MonkeyPatch, cache: Path):
    def offline(request, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(WeightsDownloadError, match=r"could not download .*download it by hand"):
        mnv3det.mobilenet_v3("small", weights="DEFAULT")


@pytest.mark.parametrize(
    ("builder", "arch", "kwargs", "match"),
    [
        ("ssdlite", "large", {"weights": "COCO_V2"}, r"valid names: DEFAULT, COCO_V1, SSDLite320"),
        (
            "lraspp",
            "large",
            {"weights": SSDLite320_MobileNet_V3_Large_Weights.COCO_V1},
            r"SSDLite320_MobileNet_V3_Large_Weights.COCO_V1 are for ssdlite\('large'\).*"
            r"COCO_WITH_VOC_LABELS_V1",
        ),
        (
            "mobilenet_v3",
            "large",
            {"weights": MobileNet_V3_Small_Weights.DEFAULT},
            r"are for mobilenet_v3\('small'\).*IMAGENET1K_V2",
        ),
        (
            "mobilenet_v3",
            "large",
            {"weights": "LRASPP_MobileNet_V3_Large_Weights.DEFAULT"},
            r"whole-model weights go to mnv3det.lraspp",
        ),
        (
            "ssdlite",
            "large",
            {"weights": "IMAGENET1K_V1"},
            r"backbone weight: pass it as weights_backbone=",
        ),
        (
            "ssdlite",
            "large",
            {"weights": MobileNet_V3_Large_Weights.DEFAULT},
            r"ImageNet backbone weights go to weights_backbone=",
        ),
        ("ssdlite", "small", {"weights": "DEFAULT"}, r"no ssdlite weights for arch='small'"),
        ("lraspp", "large", {"weights": "Foo_Weights.BAR"}, r"unknown torchvision weight enum"),
        (
            "ssdlite",
            "large",
            {"weights": "SSDLite320_MobileNet_V3_Large_Weights.COCO_V9"},
            r"unknown member",
        ),
        (
            "lraspp",
            "large",
            {"weights": "hf-hub:timm/mobilenetv3_large_100.ra_in1k"},
            r"pass it as weights_backbone=",
        ),
        (
            "ssdlite",
            "large",
            {"num_classes": 3, "weights_backbone": "COCO_V1"},
            r"mobilenet_v3\('large'\).*valid names: DEFAULT, IMAGENET1K_V1",
        ),
        (
            "mobilenet_v3",
            "large",
            {"weights": "hf-hub:timm/mobilenetv3_small_100.lamb_in1k"},
            r"MobileNetV3-Small checkpoint; build mobilenet_v3\('small'\)",
        ),
        (
            "mobilenet_v3",
            "large",
            {"weights": "hf-hub:timm/tf_mobilenetv3_large_100.in1k"},
            r"TensorFlow port.*mobilenetv3_large_100",
        ),
        ("mobilenet_v3", "small", {"weights": "hf-hub:no-slash"}, r"<owner>/<repo>"),
    ],
)
def test_wrong_family_or_unknown_name_is_a_clear_error(
    serve, builder: str, arch: str, kwargs: dict, match: str
):
    with pytest.raises(ValueError, match=match):
        getattr(mnv3det, builder)(arch, **kwargs)


def test_paths_and_state_dicts_pass_through(serve, tmp_path: Path):
    state = {"a": torch.zeros(1)}
    assert resolve_weights(state, "ssdlite") is state
    assert resolve_weights(None, "lraspp") is None
    assert resolve_weights(tmp_path / "x.pth", "mobilenet_v3") == tmp_path / "x.pth"
    with pytest.raises(CheckpointNotFoundError, match=r"missing\.pth"):
        mnv3det.ssdlite(weights=str(tmp_path / "missing.pth"))
    assert weight_names("mobilenet_v3", "small") == [
        "DEFAULT",
        "IMAGENET1K_V1",
        "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        "hf-hub:timm/mobilenetv3_small_100.<tag>",
    ]


def test_hubconf_builds_our_models(serve, tmp_path: Path):
    det = torch.hub.load(str(REPO), "ssdlite", source="local", weights=None, num_classes=5)
    assert isinstance(det, SSDLite) and det.num_classes == 5
    seg = torch.hub.load(str(REPO), "lraspp", "small", source="local", num_classes=3)
    assert seg.num_classes == 3 and seg.backbone.arch == "small"
    tv = randomize_bn_stats(torchvision.models.mobilenet_v3_small()).eval()
    serve(MobileNet_V3_Small_Weights.DEFAULT.url, _saved(tv, tmp_path / "p" / "s.pth"))
    with pytest.warns(UserWarning, match="classifier"):
        bb = torch.hub.load(
            str(REPO), "mobilenet_v3", "small", source="local", taps=["last_conv"],
            weights="DEFAULT",
        ).eval()  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (bb(x)["last_conv"] - tv.features(x)).abs().max() < 1e-5
