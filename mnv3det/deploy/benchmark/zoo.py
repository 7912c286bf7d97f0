"""What the benchmark times: the models, the configurations and how each one runs.

For SSDLite320-MobileNetV3-Large and LR-ASPP-MobileNetV3-Large, torchvision's model (random
weights, or a torchvision checkpoint) and ours with the *same* weights (its ``state_dict`` loaded by
:func:`~mnv3det.models.from_checkpoint.load_model`, so both compute the same function), in the
configurations of :data:`CONFIGS`:

* ``torchvision``: torchvision's model in eager mode (its own transform and post-processing);
* ``eager``: our model as trained (BatchNorms, our batched post-processing);
* ``fused`` / ``fused_cl``: :class:`~mnv3det.deploy.fast.FastSSDLite` /
  :func:`~mnv3det.deploy.fast.optimize_for_inference` (conv+BN folded; CL = channels_last);
* ``onnx_fp32`` / ``onnx_int8``: onnxruntime, CPU provider, all graph optimisations.

Each runs end to end (float images in ``[0, 1]`` to detections / an argmax label map) and in
stages (pre-processing, network, post-processing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from mnv3det.deploy.fast import FastSSDLite, optimize_for_inference
from mnv3det.deploy.onnx import onnx_session
from mnv3det.deploy.wrappers import SSDLiteDeploy
from mnv3det.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mnv3det.weights import read_state_dict

__all__ = [
    "CONFIGS",
    "LABELS",
    "MODEL_NAMES",
    "SSDLiteNetwork",
    "config_runner",
    "count_madds",
    "our_model",
    "parity",
    "torchvision_model",
]

CONFIGS = ("torchvision", "eager", "fused", "fused_cl", "onnx_fp32", "onnx_int8")
LABELS = {
    "torchvision": "torchvision eager",
    "eager": "ours eager",
    "fused": "ours fused",
    "fused_cl": "ours fused+CL",
    "onnx_fp32": "ONNX fp32",
    "onnx_int8": "ONNX int8",
}
MODEL_NAMES = {"ssdlite": "SSDLite320-MNV3-Large", "lraspp": "LR-ASPP-MNV3-Large"}


def torchvision_model(
    kind: str,
    weights: str | Path | Mapping[str, Tensor] | None = None,
    random_bn: bool = False,
) -> nn.Module:
    """torchvision's model in eval mode: random weights (seeded) or ``weights``.

    Args:
        kind: ``"ssdlite"`` (``ssdlite320_mobilenet_v3_large``, 91 classes) or ``"lraspp"``
            (``lraspp_mobilenet_v3_large``, 21 classes).
        weights: a torchvision checkpoint (file or state_dict) of that model.
        random_bn: randomise the BatchNorm statistics of random weights (seeded), so that
            activations are not all near zero.
    """
    import torchvision

    torch.manual_seed(0)
    if kind == "ssdlite":
        model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None
        )
    else:
        model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=21
        )
    if weights is not None:
        state = weights if isinstance(weights, Mapping) else read_state_dict(weights)[0]
        model.load_state_dict(state)
    elif random_bn:
        from mnv3det.testing import randomize_bn_stats

        randomize_bn_stats(model)
    return model.eval()


def our_model(kind: str, state: Mapping[str, Tensor]) -> nn.Module:
    """Ours with torchvision's weights, rebuilt by
    :func:`mnv3det.models.from_checkpoint.load_model` (it reads the tail and the classes from
    the tensors: reduced tail and 91 classes for SSDLite, full tail and 21 for LR-ASPP)."""
    from mnv3det.models.from_checkpoint import load_model

    return load_model(state, builder=kind)


class SSDLiteNetwork(nn.Module):
    """The ONNX "network" graph of SSDLite: pre-processing + layers, no post-processing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.deploy = SSDLiteDeploy(model)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(cls_logits, bbox_regression)`` of ``images (N, 3, H, W)`` in ``[0, 1]``."""
        return self.deploy.network(images)


def count_madds(model: Callable[[Tensor], object], example: Tensor) -> int:
    """Multiply-adds of one forward (conv/linear/matmul; FLOPs / 2, the paper's convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() // 2


def parity(tv: nn.Module, ours: nn.Module, images: Tensor) -> float:
    """Max |logits difference| of our LR-ASPP and torchvision's (same weights) on ``images``
    in ``[0, 1]``: ``ours(images)`` against ``tv(normalize(images))["out"]`` (torchvision's
    takes ImageNet-normalised input, ours normalises inside)."""
    with torch.no_grad():
        ref = tv(Normalize(IMAGENET_MEAN, IMAGENET_STD)(images))["out"]
        return float((ref - ours(images)).abs().max())


def _ssdlite_stages(pre: Callable, net: Callable, post: Callable) -> Callable:
    """``stages(images)`` of our SSDLite: ``pre -> (batch, sizes)``, ``net(batch) -> (outputs,
    anchors)``, ``post(outputs, anchors, sizes)``, each timed on the previous one's result."""

    def stages(x: Tensor) -> list[tuple[str, Callable]]:
        batch, original = pre(x)
        outputs, anchors = net(batch)
        return [
            ("pre", lambda: pre(x)),
            ("network", lambda: net(batch)),
            ("post", lambda: post(outputs, anchors, original)),
        ]

    return stages


def config_runner(spec: dict) -> tuple[Callable, Callable]:
    """``(end_to_end(images), stages(images) -> [(stage name, thunk), ...])`` of one config.

    Args:
        spec: the worker's job: ``model``, ``config``, ``threads``, ``passive``, the weights file
            and the ONNX files of :func:`mnv3det.deploy.benchmark.runner.prepare`.
    """
    kind, config = spec["model"], spec["config"]
    if config.startswith("onnx"):
        session = onnx_session(spec[config], spec["threads"], spec.get("passive", False))
        if kind == "ssdlite":
            net_session = onnx_session(
                spec[config + "_network"], spec["threads"], spec.get("passive", False)
            )

            def e2e(x: Tensor):
                return session.run(None, {"images": x.numpy()})

            def stages(x: Tensor):
                return [("network", lambda: net_session.run(None, {"images": x.numpy()}))]

            return e2e, stages

        def seg_net(x: Tensor):
            return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

        def e2e(x: Tensor):
            return seg_net(x).argmax(1)

        def stages(x: Tensor):
            logits = seg_net(x)
            return [("network", lambda: seg_net(x)), ("post", lambda: logits.argmax(1))]

        return e2e, stages

    state, _ = read_state_dict(spec["weights"])
    model = torchvision_model(kind, state) if config == "torchvision" else our_model(kind, state)

    if kind == "ssdlite":
        if config == "torchvision":
            tv = model

            def e2e(x: Tensor):
                return tv(list(x))

            def stages(x: Tensor):
                images, _ = tv.transform(list(x))
                features = list(tv.backbone(images.tensors).values())
                head = tv.head(features)
                anchors = tv.anchor_generator(images, features)
                original = [tuple(i.shape[-2:]) for i in x]

                def post():
                    dets = tv.postprocess_detections(head, anchors, images.image_sizes)
                    return tv.transform.postprocess(dets, images.image_sizes, original)

                def net():
                    f = list(tv.backbone(images.tensors).values())
                    return tv.head(f), tv.anchor_generator(images, f)

                return [("pre", lambda: tv.transform(list(x))), ("network", net), ("post", post)]

            return e2e, stages
        if config == "eager":
            return model, _ssdlite_stages(
                lambda x: model.preprocess(x)[:2], model.head_outputs, model.postprocess
            )
        fast = FastSSDLite(model, channels_last=config == "fused_cl")
        return fast, _ssdlite_stages(fast.preprocess, fast.network, fast.postprocess)

    # LR-ASPP: [torchvision: normalise] -> logits -> argmax (ours normalises in its network)
    channels_last = config == "fused_cl"
    if config in ("fused", "fused_cl"):
        model = optimize_for_inference(model, channels_last=channels_last)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD) if config == "torchvision" else nn.Identity()

    def pre(x: Tensor) -> Tensor:
        y = normalize(x)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    def net(y: Tensor) -> Tensor:
        out = model(y)
        return out["out"] if isinstance(out, dict) else out

    def e2e(x: Tensor):
        return net(pre(x)).argmax(1)

    def stages(x: Tensor):
        y = pre(x)
        logits = net(y)
        return [
            ("pre", lambda: pre(x)),
            ("network", lambda: net(y)),
            ("post", lambda: logits.argmax(1)),
        ]

    return e2e, stages
