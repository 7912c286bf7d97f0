"""LightningModules and LightningDataModules: detection (SSDLite/COCO) and segmentation
(LR-ASPP/Cityscapes). Configs name them by class path, e.g.
``mnv3det.tasks.detection.DetectionTask``.
"""
