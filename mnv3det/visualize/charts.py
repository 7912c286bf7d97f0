"""matplotlib charts of evaluations and training runs, written as PNG files.

Every function draws on its own ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot,
no global backend switch, safe in worker threads and notebooks) and saves it to ``path``:

* :func:`plot_pr_curves`: COCO precision-recall curve of each class at one IoU threshold, from
  COCOeval's own precision array (:class:`mnv3det.metrics.coco.CocoCurves`), with the mean over
  the classes in bold (Ultralytics' ``PR_curve.png``);
* :func:`plot_per_class_ap`: AP@[.5:.95] and AP50 bars per class;
* :func:`plot_iou`: per-class IoU bars with the mIoU line;
* :func:`plot_confusion_matrix`: the confusion matrix normalised per ground-truth row
  (:func:`normalize_confmat`; Ultralytics' ``confusion_matrix_normalized.png``);
* :func:`plot_results`: the curves of a run's ``metrics.csv`` (Lightning's CSV logger), one panel
  per logged quantity (Ultralytics' ``results.png``).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnv3det.metrics.coco import CocoCurves

__all__ = [
    "normalize_confmat",
    "plot_confusion_matrix",
    "plot_iou",
    "plot_per_class_ap",
    "plot_pr_curves",
    "plot_results",
    "read_metrics_csv",
]

_DETAIL = re.compile(r"_(small|medium|large)$|/mar_(1|10)$")
"""Columns of ``metrics.csv`` that :func:`plot_results` leaves out (COCO's finer numbers)."""

MAX_LEGEND = 20
"""Classes named in a PR-curve legend; with more, the curves are drawn thin and unnamed."""


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, facecolor="white")
    return path


def plot_pr_curves(curves: CocoCurves, path: str | Path, iou: float = 0.5) -> Path:
    """Precision-recall curve of every class with ground truth, at IoU ``iou`` (area all,
    100 detections), straight from COCOeval's precision array.

    Args:
        curves: the evaluation's :class:`~mnv3det.metrics.coco.CocoCurves`.
        path: PNG to write.
        iou: the IoU threshold of the curves (one of COCOeval's, 0.50 ... 0.95).

    Returns:
        ``path``.
    """
    t = int(np.argmin(np.abs(np.asarray(curves.iou_thrs) - iou)))
    recall = np.asarray(curves.rec_thrs)
    figure = _figure(9, 6.5)
    axes = figure.add_subplot()
    present = []
    for k, name in enumerate(curves.cat_names):
        precision = curves.precision[t, :, k, 0, -1]
        if (precision > -1).any():
            present.append((name, precision, float(precision[precision > -1].mean())))
    many = len(present) > MAX_LEGEND
    for name, precision, ap in present:
        if many:
            axes.plot(recall, precision, color="grey", linewidth=0.5, alpha=0.6)
        else:
            axes.plot(recall, precision, linewidth=1.2, label=f"{name} {ap:.3f}")
    if present:
        mean = np.mean([p for _, p, _ in present], axis=0)
        axes.plot(
            recall,
            mean,
            color="blue",
            linewidth=3,
            label=f"all classes {np.mean([a for *_, a in present]):.3f} mAP@{iou:.2f}",
        )
        title = f"AP50 ({len(present)} classes in grey)" if many else "AP50 per class"
        axes.legend(loc="lower left", fontsize=9, title=title)
    else:
        axes.text(0.5, 0.5, "no ground truth", ha="center", va="center")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="Recall", ylabel="Precision")
    axes.set_title(f"Precision-recall curves (COCOeval, IoU {iou:.2f}, area all, 100 dets)")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_per_class_ap(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Horizontal AP@[.5:.95] and AP50 bars per class (rows of
    :func:`mnv3det.metrics.coco.per_class_ap`; classes without ground truth left out)."""
    rows = [r for r in rows if r["ap"] == r["ap"]]
    figure = _figure(9, max(3.0, 0.32 * len(rows) + 1.6))
    axes = figure.add_subplot()
    if rows:
        y = np.arange(len(rows))
        ap50 = [100 * r["ap50"] for r in rows]
        ap = [100 * r["ap"] for r in rows]
        axes.barh(y + 0.2, ap50, height=0.4, color="#9ecae1", label="AP50")
        axes.barh(y - 0.2, ap, height=0.4, color="#08519c", label="AP@[.5:.95]")
        for yi, value, value50 in zip(y, ap, ap50, strict=True):
            axes.text(value + 0.8, yi - 0.2, f"{value:.1f}", va="center", fontsize=8)
            axes.text(value50 + 0.8, yi + 0.2, f"{value50:.1f}", va="center", fontsize=8)
        labels = [f"{r['name']} ({r['num_gt']})" for r in rows]
        axes.set_yticks(y, labels, fontsize=9)
        axes.invert_yaxis()
        mean = np.mean(ap)
        axes.axvline(mean, color="black", linestyle="--", linewidth=1)
        axes.plot([], [], "k--", linewidth=1, label=f"mAP {mean:.1f}")
        figure.legend(loc="outside lower center", ncol=3, fontsize=9)  # never over a bar
    axes.set(xlim=(0, 105), xlabel="AP (%)")
    axes.set_title("COCO AP per class (ground-truth boxes in brackets)")
    axes.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def plot_iou(iou: Sequence[float], class_names: Sequence[str], path: str | Path) -> Path:
    """Per-class IoU bars (NaN = class absent, left out) with the mIoU as a dashed line."""
    pairs = [(n, float(v)) for n, v in zip(class_names, iou, strict=True) if v == v]
    figure = _figure(9, max(3.0, 0.32 * len(pairs) + 1.6))
    axes = figure.add_subplot()
    if pairs:
        y = np.arange(len(pairs))
        values = [100 * v for _, v in pairs]
        axes.barh(y, values, color="#2ca25f")
        for yi, value in zip(y, values, strict=True):
            axes.text(value + 0.8, yi, f"{value:.1f}", va="center", fontsize=8)
        axes.set_yticks(y, [n for n, _ in pairs], fontsize=9)
        axes.invert_yaxis()
        miou = float(np.mean(values))
        axes.axvline(miou, color="black", linestyle="--", linewidth=1, label=f"mIoU {miou:.1f}")
        figure.legend(loc="outside lower center", fontsize=9)  # never over a bar
    axes.set(xlim=(0, 105), xlabel="IoU (%)")
    axes.set_title(f"IoU per class ({len(pairs)} classes present)")
    axes.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def normalize_confmat(confmat: Any) -> np.ndarray:
    """Each ground-truth row divided by its sum (the class's recall on the diagonal); rows of
    classes without ground truth stay 0."""
    cm = np.asarray(confmat, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def plot_confusion_matrix(
    confmat: Any,
    class_names: Sequence[str],
    path: str | Path,
    only_present: bool = True,
) -> np.ndarray:
    """Draw the row-normalised confusion matrix (rows: ground truth, columns: prediction).

    Args:
        confmat: ``(C, C)`` pixel counts.
        class_names: one name per class.
        path: PNG to write.
        only_present: leave out classes that are neither in the ground truth nor predicted.

    Returns:
        The normalised matrix that was drawn (rows of present classes sum to 1).
    """
    cm = np.asarray(confmat, dtype=np.float64)
    keep = np.arange(len(cm))
    if only_present:
        keep = np.flatnonzero((cm.sum(axis=0) + cm.sum(axis=1)) > 0)
        if keep.size == 0:
            keep = np.arange(len(cm))
    normalized = normalize_confmat(cm[np.ix_(keep, keep)])
    names = [class_names[k] for k in keep]
    n = len(names)
    side = min(16.0, max(5.0, 0.45 * n + 2.5))
    figure = _figure(side + 1.2, side)
    axes = figure.add_subplot()
    image = axes.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                value = normalized[i, j]
                if value >= 0.005:
                    color = "white" if value > 0.5 else "black"
                    axes.text(
                        j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color
                    )
    axes.set_xticks(range(n), names, rotation=90, fontsize=9)
    axes.set_yticks(range(n), names, fontsize=9)
    axes.set(xlabel="prediction", ylabel="ground truth")
    axes.set_title("Confusion matrix, normalised per ground-truth row")
    _save(figure, path)
    return normalized


def read_metrics_csv(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{column: (steps, values)}`` of a Lightning ``metrics.csv``, empty cells dropped."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    columns: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        step = row.get("step", "")
        if step in ("", None):
            continue
        for key, value in row.items():
            if key in ("step", "epoch") or value in ("", None):
                continue
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                columns.setdefault(key, ([], []))
                columns[key][0].append(float(step))
                columns[key][1].append(number)
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in columns.items()}


def _smooth(values: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """A centred moving average over ``fraction`` of the points (the trend of noisy step losses)."""
    window = max(1, int(len(values) * fraction)) | 1
    if window < 3:
        return values
    padded = np.pad(values, window // 2, mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def plot_results(metrics_csv: str | Path, path: str | Path, max_panels: int = 16) -> Path:
    """Training curves of a run: one panel per logged quantity, against the training step.

    Losses logged every few steps are drawn raw (thin) with a moving average (bold);
    validation numbers as points joined by lines. Per-class numbers (``.../iou/<class>``), the
    COCO size splits (``*_small/medium/large``), ``mar_1``/``mar_10`` and numbers that are
    undefined throughout (-1) are left out. The learning rate gets its own panel.

    Args:
        metrics_csv: the run's ``metrics.csv``.
        path: PNG to write.
        max_panels: at most this many panels (losses first, then validation numbers).

    Returns:
        ``path``.
    """
    columns = {
        k: v
        for k, v in read_metrics_csv(metrics_csv).items()
        if not (v[1] == -1).all() and not _DETAIL.search(k)  # -1: undefined in pycocotools
    }
    names = [k for k in columns if k.count("/") <= 1 and not k.startswith("lr")]
    names.sort(key=lambda k: (not k.startswith("train"), "loss" not in k, k))
    names += sorted(k for k in columns if k.startswith("lr"))
    names = names[:max_panels]
    ncols = min(4, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    figure = _figure(3.6 * ncols, 2.8 * nrows)
    last = max([1.0] + [float(columns[n][0].max()) for n in names])
    for i, name in enumerate(names):
        axes = figure.add_subplot(nrows, ncols, i + 1)
        steps, values = columns[name]
        if len(values) > 20:
            axes.plot(steps, values, color="#1f77b4", linewidth=0.6, alpha=0.4, label="raw")
            axes.plot(steps, _smooth(values), color="#ff7f0e", linewidth=1.8, label="smooth")
            axes.legend(fontsize=7)
        else:
            axes.plot(steps, values, marker="o", markersize=4, color="#1f77b4")
        axes.set_xlim(-0.02 * last, 1.02 * last)  # every panel spans the whole run
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
    if not names:
        figure.add_subplot().text(0.5, 0.5, "nothing logged yet", ha="center", va="center")
    figure.suptitle(f"Training run: {Path(metrics_csv).parent}", fontsize=11)
    return _save(figure, path)
