"""Semantic segmentation metrics from an accumulated confusion matrix (paper §6.4, Cityscapes mIoU).

The Cityscapes benchmark (and the MobileNetV3 paper's LR-ASPP numbers, Tables 7-8) score the
19 evaluated classes by intersection over union accumulated over the *whole* data set, not
averaged per image: ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` from one confusion matrix summed
over all pixels whose ground truth is not 255 (ignored).

:class:`SegmentationMetrics` is a torchmetrics ``Metric`` whose only state is that confusion
matrix with ``dist_reduce_fx="sum"``, so under DDP every process's matrix is summed before
``compute()``: the result is exactly the single-process one (padding samples that a
``DistributedSampler`` repeats aside).

Definitions (``compute()`` keys):

* ``iou``: per-class IoU, ``NaN`` for a class that is neither in the ground truth nor predicted
  (union 0: no evidence either way).
* ``miou``: mean IoU over the classes *present* (union > 0), i.e. ignoring the ``NaN`` entries.
  This is what cityscapesScripts' ``evalPixelLevelSemanticLabeling`` reports (it returns NaN
  for an empty union and averages the others); on the real val set all 19 classes occur, so it
  is the mean over all 19. On a generated data set with 7 classes it is the mean over those 7.
  torchmetrics' ``MulticlassJaccardIndex(average="macro", ignore_index=255)`` gives the same.
* ``miou_all``: mean over all ``num_classes``, absent classes counted as 0 (the mean of
  torchmetrics' ``average=None`` vector, which reports 0 for an empty union).
* ``pixel_acc``: correctly classified / all non-ignored pixels.
* ``mean_acc``: mean per-class recall over classes present in the ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from mnv3det.data.cityscapes_labels import CLASS_NAMES, IGNORE_INDEX


class SegmentationMetrics(Metric):
    """Confusion-matrix mIoU, per-class IoU and pixel accuracy, correct under DDP.

    Args:
        num_classes: number of evaluated classes (19 for Cityscapes).
        ignore_index: ground-truth value that is not evaluated (255).
        class_names: names for :meth:`table`; default the Cityscapes train-id names when
            ``num_classes == 19``, else ``class0, class1, ...``.

    Example:
        >>> metric = SegmentationMetrics(num_classes=19)
        >>> metric.update(logits, masks)  # logits (N, C, H, W) or labels (N, H, W)
        >>> metric.compute()["miou"]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int = 19,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"SegmentationMetrics: num_classes must be >= 1, got {num_classes}")
        if class_names is None:
            class_names = (
                CLASS_NAMES
                if num_classes == len(CLASS_NAMES)
                else [f"class{i}" for i in range(num_classes)]
            )
        if len(class_names) != num_classes:
            raise ValueError(
                f"SegmentationMetrics: {len(class_names)} class_names for {num_classes} classes"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names)
        # confmat[t, p]: pixels of ground-truth class t predicted as p. int64: Cityscapes val
        # alone has 1e9 pixels, more than int32 holds.
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch.

        Args:
            preds: logits/scores ``(N, C, H, W)`` (argmax over C is taken) or labels ``(N, H, W)``.
            target: ground truth ``(N, H, W)`` with values in ``0..num_classes-1`` or
                ``ignore_index``.

        Raises:
            ValueError: shapes differ or the target holds a value that is neither a class nor
                the ignore index.
        """
        if preds.ndim == target.ndim + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"SegmentationMetrics: logits have {preds.shape[1]} channels, expected "
                    f"{self.num_classes}"
                )
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(
                f"SegmentationMetrics: prediction shape {tuple(preds.shape)} != target shape "
                f"{tuple(target.shape)}"
            )
        valid = target != self.ignore_index
        t = target[valid].long()
        p = preds[valid].long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            bad = sorted(set(t[(t < 0) | (t >= self.num_classes)].unique().tolist()))
            raise ValueError(
                f"SegmentationMetrics: target values {bad[:10]} are neither classes "
                f"0..{self.num_classes - 1} nor ignore_index {self.ignore_index}"
            )
        p = p.clamp(0, self.num_classes - 1)
        # bincount of t * C + p is the confusion matrix in one pass (as torchmetrics and the
        # cityscapesScripts fast path do).
        counts = torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2)
        self.confmat += counts.reshape(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        """``{"iou", "miou", "miou_all", "pixel_acc", "mean_acc"}`` (see the module docstring)."""
        return metrics_from_confmat(self.confmat)

    def global_confmat(self) -> Tensor:
        """The confusion matrix summed over all processes (a copy).

        ``self.confmat`` is this process's share only: torchmetrics syncs the state inside
        ``compute()`` and restores the local state afterwards.
        """
        with self.sync_context():
            return self.confmat.detach().clone()

    def table(self, results: dict[str, Tensor] | None = None) -> str:
        """The per-class IoU table of the current state (or of ``results``) as text."""
        results = self.compute() if results is None else results
        return format_iou_table(results, self.class_names, self.global_confmat())


def metrics_from_confmat(confmat: Tensor) -> dict[str, Tensor]:
    """Per-class IoU, mIoU (present / all classes), pixel and mean accuracy from a confusion matrix.

    Args:
        confmat: ``(C, C)`` counts, rows = ground truth, columns = prediction.
    """
    cm = confmat.double()
    tp = cm.diag()
    gt = cm.sum(dim=1)
    pred = cm.sum(dim=0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = union > 0
    total = cm.sum()
    nan = torch.tensor(float("nan"), dtype=cm.dtype, device=cm.device)
    return {
        "iou": iou.float(),
        "miou": (iou[present].mean() if present.any() else nan).float(),
        "miou_all": torch.nan_to_num(iou, nan=0.0).mean().float(),
        "pixel_acc": (tp.sum() / total if total > 0 else nan).float(),
        "mean_acc": ((tp / gt.clamp(min=1))[gt > 0].mean() if (gt > 0).any() else nan).float(),
    }


def format_iou_table(
    results: dict[str, Tensor],
    class_names: Sequence[str] = CLASS_NAMES,
    confmat: Tensor | None = None,
) -> str:
    """Format per-class IoU with class names, like the Cityscapes evaluation script prints it.

    Args:
        results: output of :meth:`SegmentationMetrics.compute` (``iou``, ``miou``, ...).
        class_names: one name per class.
        confmat: optional confusion matrix, to add each class's ground-truth pixel share.

    Returns:
        A multi-line string; absent classes (no ground truth, never predicted) show ``n/a``.
    """
    iou = results["iou"].tolist()
    if len(iou) != len(class_names):
        raise ValueError(f"format_iou_table: {len(iou)} IoU values for {len(class_names)} names")
    share = None
    if confmat is not None:
        gt = confmat.double().sum(dim=1)
        share = (gt / gt.sum().clamp(min=1)).tolist()
    width = max(18, max(len(n) for n in class_names) + 2)
    header = f"{'class':<{width}} {'IoU':>7}" + (f" {'GT px':>7}" if share else "")
    lines = [header, "-" * len(header)]
    for i, (name, value) in enumerate(zip(class_names, iou)):
        cell = "    n/a" if value != value else f"{100 * value:7.2f}"  # NaN check
        line = f"{name:<{width}} {cell}"
        if share:
            line += f" {100 * share[i]:6.2f}%"
        lines.append(line)
    lines.append("-" * len(header))
    present = sum(1 for v in iou if v == v)
    lines.append(
        f"{'mIoU (' + str(present) + ' present)':<{width}} {100 * float(results['miou']):7.2f}"
    )
    if "miou_all" in results:
        lines.append(
            f"{'mIoU (all ' + str(len(iou)) + ')':<{width}} {100 * float(results['miou_all']):7.2f}"
        )
    if "pixel_acc" in results:
        lines.append(f"{'pixel accuracy':<{width}} {100 * float(results['pixel_acc']):7.2f}")
    return "\n".join(lines)


__all__ = ["SegmentationMetrics", "format_iou_table", "metrics_from_confmat"]
