"""Data: COCO and Cityscapes readers, albumentations pipelines and synthetic data generators."""
