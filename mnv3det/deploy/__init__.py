"""Deployment: fast PyTorch inference, ONNX export, int8 quantisation and the benchmark."""
