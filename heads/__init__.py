"""Task heads (SSDLite, LR-ASPP) that know nothing of MobileNetV3.

They take channel lists and feature maps; :mod:`mnv3det.models` attaches them to the backbone.
"""
