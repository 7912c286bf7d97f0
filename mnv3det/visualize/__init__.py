"""Pictures and charts: what the demo, the prediction writers and the plots callback draw.

* :mod:`mnv3det.visualize.drawing`: boxes with legible labels (class and score on a filled
  background, kept inside the image), segmentation colour masks and overlays, colour legends and
  the sheets (detection: ground truth | prediction; segmentation: image | ground truth |
  prediction | overlay, with column titles);
* :mod:`mnv3det.visualize.charts`: matplotlib charts (Agg canvas, no pyplot state): COCO
  precision-recall curves and per-class AP, per-class IoU bars, the normalised confusion matrix
  and the training curves of a run's ``metrics.csv``.

:class:`mnv3det.tasks.plots.PlotWriter` writes them into a run folder.
"""
