"""Deployment: fast PyTorch inference, ONNX export, int8 quantisation and the benchmark.

No training code here (the arrows run ``models <- deploy <- cli``; ``deploy`` imports no task):

* :mod:`mnv3det.deploy.fast`: conv+BN folding, channels_last, :class:`FastSSDLite`;
* :mod:`mnv3det.deploy.wrappers`: tensor-in, tensor-out modules the ONNX graphs are traced from;
* :mod:`mnv3det.deploy.onnx`: ONNX export, checking, and exported graphs run as models;
* :mod:`mnv3det.deploy.int8`: onnxruntime static int8 quantisation and calibration images;
* :mod:`mnv3det.deploy.openvino`: OpenVINO IR export and CPU compilation of the ONNX files;
* :mod:`mnv3det.deploy.memory`: :func:`reuse_freed_memory` (glibc setting for large tensors);
* :mod:`mnv3det.deploy.benchmark`: the speed table of ``mnv3det benchmark``.
"""

from mnv3det.deploy.fast import FastSSDLite, fuse_conv_bn, optimize_for_inference
from mnv3det.deploy.int8 import calibration_images, quantize_onnx
from mnv3det.deploy.memory import reuse_freed_memory
from mnv3det.deploy.onnx import OnnxDetector, OnnxSegmenter, export_lraspp, export_ssdlite
from mnv3det.deploy.wrappers import SegmenterDeploy, SSDLiteDeploy

__all__ = [
    "FastSSDLite",
    "OnnxDetector",
    "OnnxSegmenter",
    "SSDLiteDeploy",
    "SegmenterDeploy",
    "calibration_images",
    "export_lraspp",
    "export_ssdlite",
    "fuse_conv_bn",
    "optimize_for_inference",
    "quantize_onnx",
    "reuse_freed_memory",
]
