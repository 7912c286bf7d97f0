"""Evaluation metrics that stay correct under DDP.

:mod:`mnv3det.metrics.coco` (pycocotools COCO mAP) and :mod:`mnv3det.metrics.segmentation`
(confusion-matrix mIoU).
"""
