"""What the benchmark times: the models, the configurations and how each one runs.

For SSDLite320-MobileNetV3-Large and LR-ASPP-MobileNetV3-Large, torchvision's model (random
weights, or a torchvision checkpoint) and ours with the *same* weights (its ``state_dict`` loaded by
:func:`~mnv3det.models.from_checkpoint.load_model`, so both compute the same function), in the
configurations of :data:`CONFIGS`:

* ``torchvision``: torchvision's model in eager mode (its own transform and post-processing);
* ``eager``: our model as trained (BatchNorms, our batched post-processing);
* ``fused`` / ``fused_cl``: :class:`~mnv3det.deploy.fast.FastSSDLite` /
  :func:`~mnv3det.deploy.fast.optimize_for_inference` (conv+BN folded; CL = channels_last);
  ``fused_cl_bf16`` under bf16 autocast, ``fused_cl_compiled`` with ``torch.compile``
  (Inductor with freezing; the compilation happens in the warm-up calls);
* ``onnx_fp32`` / ``onnx_int8``: onnxruntime, CPU provider, all graph optimisations;
* ``executorch_fp32`` / ``executorch_int8``: the ``.pte`` programs in ExecuTorch's runtime
  (XNNPACK; :mod:`mnv3det.deploy.benchmark.mobile`).

Each runs end to end (float images in ``[0, 1]`` to detections / an argmax label map) and in
stages (pre-processing, network, post-processing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from heads.label_map import bilinear_argmax
from mnv3det.deploy.fast import FastSSDLite, compile_frozen, optimize_for_inference
from mnv3det.deploy.onnx import onnx_session
from mnv3det.deploy.openvino import compile_openvino
from mnv3det.deploy.wrappers import SSDLiteDeploy
from mnv3det.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mnv3det.weights import read_state_dict

__all__ = [
    "CONFIGS",
    "LABELS",
    "MODEL_NAMES",
    "SCORE_REGIMES",
    "SSDLiteNetwork",
    "apply_score_regime",
    "config_runner",
    "count_madds",
    "our_model",
    "parity",
    "torchvision_model",
]

CONFIGS = (
    "torchvision",
    "eager",
    "fused",
    "fused_cl",
    "fused_cl_bf16",
    "fused_cl_compiled",
    "onnx_fp32",
    "onnx_int8",
    "openvino_fp32",
    "openvino_bf16",
    "executorch_fp32",
    "executorch_int8",
)
LABELS = {
    "torchvision": "torchvision eager",
    "eager": "ours eager",
    "fused": "ours fused",
    "fused_cl": "ours fused+CL",
    "fused_cl_bf16": "ours fused+CL bf16",
    "fused_cl_compiled": "ours fused+CL compiled",
    "onnx_fp32": "ONNX fp32",
    "onnx_int8": "ONNX int8",
    "openvino_fp32": "OpenVINO fp32 (our ONNX)",
    "openvino_bf16": "OpenVINO bf16 (our ONNX)",
    "executorch_fp32": "ExecuTorch fp32 (XNNPACK)",
    "executorch_int8": "ExecuTorch int8 (XNNPACK)",
}
#: SSDLite score distributions (:func:`apply_score_regime`).
SCORE_REGIMES = ("trained", "heavy", "random")
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


def apply_score_regime(model: nn.Module, regime: str, image: Tensor) -> dict:
    """Give torchvision's SSDLite a score distribution by rescaling its class logits.

    The last convolution of each classification head is scaled so that the class logits have
    the standard deviation of the regime on ``image`` (random weights leave them near zero:
    every score about 1/91, all exactly equal), plus a background bias:

    * ``"trained"``: std 2, background +10: most anchors are background, about 1 % of the
      (anchor, class) scores pass 0.001, as with a trained detector on a natural image;
    * ``"heavy"``: std 3, no background bias (a sharpened, over-confident or untrained
      classifier): most classes of most anchors pass 0.001, NMS gets 90 x 300 candidates;
    * ``"random"``: unchanged (all scores equal).

    Returns:
        ``{"candidates": scores above 0.001 on image, "distinct": whether no two tie}``.
    """
    convs = [
        layer[-1] if isinstance(layer, nn.Sequential) else layer
        for layer in model.head.classification_head.module_list
    ]

    def logits() -> Tensor:
        images, _ = model.transform(list(image))
        features = list(model.backbone(images.tensors).values())
        return model.head(features)["cls_logits"]

    with torch.no_grad():
        if regime != "random":
            std, background = {"trained": (2.0, 10.0), "heavy": (3.0, 0.0)}[regime]
            measured = float(logits().std()) or 1.0
            for conv in convs:
                conv.weight.mul_(std / measured)
                bias = conv.bias.view(-1, model.head.classification_head.num_columns)
                bias.mul_(std / measured)
                bias[:, 0] += background
        scores = logits().softmax(-1)[..., 1:]
        passed = scores[scores > 0.001]
    return {
        "candidates": int(passed.numel()),
        "distinct": bool(passed.unique().numel() == passed.numel()),
    }


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


def _label_map_runner(low_logits: Callable[[Tensor], Tensor]) -> tuple[Callable, Callable]:
    """``(e2e, stages)`` of an LR-ASPP graph with stride-8 ``low_logits`` output (the runner's
    export): network, then the label map by :func:`heads.label_map.bilinear_argmax`, as the
    *ours* rows compute it."""

    def e2e(x: Tensor) -> Tensor:
        return bilinear_argmax(low_logits(x), tuple(x.shape[-2:]))

    def stages(x: Tensor):
        logits = low_logits(x)
        size = tuple(x.shape[-2:])
        return [("network", lambda: low_logits(x)), ("post", lambda: bilinear_argmax(logits, size))]

    return e2e, stages


def config_runner(spec: dict) -> tuple[Callable, Callable]:
    """``(end_to_end(images), stages(images) -> [(stage name, thunk), ...])`` of one config.

    Args:
        spec: the worker's job: ``model``, ``config``, ``threads``, ``passive``, the weights file
            and the ONNX files of :func:`mnv3det.deploy.benchmark.runner.prepare`.
    """
    kind, config = spec["model"], spec["config"]
    if config.startswith("executorch"):  # deploy.benchmark.mobile: the .pte programs
        from mnv3det.deploy.benchmark.mobile import executorch_runner

        return executorch_runner(spec)
    if config.startswith("openvino"):
        onnx_file = spec["onnx_fp32"]
        shape = (spec["batch"], 3, *spec["input_size"])
        bf16 = config.endswith("bf16")
        compiled = compile_openvino(onnx_file, spec["threads"], bf16, shape)
        if kind == "ssdlite":
            net_compiled = compile_openvino(spec["onnx_fp32_network"], spec["threads"], bf16, shape)

            def e2e(x: Tensor):
                return compiled(x.numpy())

            def stages(x: Tensor):
                return [("network", lambda: net_compiled(x.numpy()))]

            return e2e, stages

        def ov_net(x: Tensor):
            return torch.from_numpy(compiled(x.numpy())[0])

        return _label_map_runner(ov_net)
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

        return _label_map_runner(seg_net)

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
        fast = FastSSDLite(
            model,
            channels_last=config.startswith("fused_cl"),
            bf16=config.endswith("bf16"),
            compile=config.endswith("compiled"),
        )
        return fast, _ssdlite_stages(fast.preprocess, fast.network, fast.postprocess)

    # LR-ASPP: [torchvision: normalise] -> logits -> label map (torchvision: full-size logits
    # then argmax; ours: stride-8 logits then heads.label_map.bilinear_argmax, normalising
    # inside the network)
    channels_last = config.startswith("fused_cl")
    bf16 = config.endswith("bf16")
    if config.startswith("fused"):
        model = optimize_for_inference(model, channels_last=channels_last)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD) if config == "torchvision" else nn.Identity()

    def pre(x: Tensor) -> Tensor:
        y = normalize(x)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    if config == "torchvision":

        def net(y: Tensor) -> Tensor:
            return model(y)["out"]

        def post(logits: Tensor, size: tuple[int, int]) -> Tensor:
            return logits.argmax(1)

    else:

        def low_logits(y: Tensor) -> Tensor:
            return model.classifier(model.features(y))

        if config.endswith("compiled"):
            low_logits = compile_frozen(low_logits)

        def net(y: Tensor) -> Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return low_logits(y).float()

        def post(logits: Tensor, size: tuple[int, int]) -> Tensor:
            return bilinear_argmax(logits, size)

    def e2e(x: Tensor):
        return post(net(pre(x)), tuple(x.shape[-2:]))

    def stages(x: Tensor):
        y = pre(x)
        logits = net(y)
        size = tuple(x.shape[-2:])
        return [
            ("pre", lambda: pre(x)),
            ("network", lambda: net(y)),
            ("post", lambda: post(logits, size)),
        ]

    return e2e, stages
