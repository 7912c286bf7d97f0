"""LightningModule for LR-ASPP semantic segmentation on Cityscapes (paper §6.4).

Configs name it ``mnv3det.tasks.segmentation.SegmentationTask`` together with
:class:`mnv3det.tasks.segmentation_data.CityscapesDataModule`:

* the model is :func:`mnv3det.lraspp` (arch, width, reduced tail, dilation, gate pooling, low
  tap, torchvision/ImageNet weights);
* data come as images in [0, 1] and go to the model as they are: the model normalises them
  itself (ImageNet mean/std by default, what torchvision's and the ImageNet backbone weights
  expect; see :mod:`mnv3det.models.normalize`), like SSDLite;
* training: per-pixel cross-entropy with ``ignore_index=255``, SGD with momentum and a
  per-step polynomial ("poly", power 0.9) learning-rate decay, the DeepLab/LR-ASPP recipe
  (:func:`mnv3det.tasks.optim.sgd_with_schedule`); fast by default: channels_last weights,
  bf16 autocast of the training step on a CPU with native bf16, a fused SGD step
  (:mod:`mnv3det.tasks.speed`; ``compile: true`` adds torch.compile);
* validation/test: the full image (optionally with sliding-window inference for images larger
  than the training crop), a confusion-matrix mIoU over the 19 classes that is correct under
  DDP (:class:`mnv3det.metrics.segmentation.SegmentationMetrics`), logged as ``val/miou``,
  ``val/pixel_acc``, ``val/miou_all`` and ``val/iou/<class>``; the per-class table is printed at
  the end of every validation;
* predict: train-id masks at the original image size, written as label-id PNGs, colour masks
  and overlays by :class:`mnv3det.tasks.segmentation_writer.SegmentationPredictionWriter`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from mnv3det.data.cityscapes_labels import CLASS_NAMES, IGNORE_INDEX, TRAINID_TO_ID
from mnv3det.metrics.segmentation import (
    SegmentationMetrics,
    format_iou_table,
    metrics_from_confmat,
)
from mnv3det.models.lraspp import lraspp
from mnv3det.tasks.checkpoints import make_checkpoint_safe
from mnv3det.tasks.description import datamodule_facts, describe_in_checkpoint
from mnv3det.tasks.divergence import (
    buffers_before_step,
    check_nonfinite_policy,
    checked_loss,
)
from mnv3det.tasks.optim import set_bn_momentum, sgd_with_schedule
from mnv3det.tasks.speed import (
    compile_modules,
    prepare_for_training,
    set_memory_format,
    step_autocast,
)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets covering ``size`` with ``window``-long windows; the last one ends at the edge."""
    starts = list(range(0, max(size - window, 0) + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def sliding_window_logits(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    window: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
) -> Tensor:
    """Logits of a large image from overlapping windows, averaged where windows overlap.

    As in mmsegmentation's ``slide`` inference: windows of ``window`` (clamped to the image)
    every ``stride`` pixels plus one flush with the bottom/right edge; the logits of overlapping
    windows are averaged. Useful when evaluating at a resolution larger than the training crop
    (e.g. 1024x2048 images, 512x1024 crops) without changing the receptive-field statistics the
    gate pooling saw in training.

    Args:
        model: maps ``(N, 3, h, w)`` images to ``(N, C, h, w)`` logits (pixel-wise input
            normalisation, as the models' own, commutes with the windows).
        images: ``(N, 3, H, W)`` images (in [0, 1] for our models).
        window: ``(height, width)`` of a window.
        stride: ``(height, width)`` step between windows.
        num_classes: ``C``.

    Returns:
        ``(N, C, H, W)`` logits.
    """
    n, _, h, w = images.shape
    wh, ww = min(int(window[0]), h), min(int(window[1]), w)
    out = images.new_zeros((n, num_classes, h, w))
    count = images.new_zeros((1, 1, h, w))
    for y in _window_starts(h, wh, int(stride[0])):
        for x in _window_starts(w, ww, int(stride[1])):
            out[:, :, y : y + wh, x : x + ww] += model(images[:, :, y : y + wh, x : x + ww])
            count[:, :, y : y + wh, x : x + ww] += 1
    return out / count


class SegmentationTask(L.LightningModule):
    """Train and evaluate LR-ASPP-MobileNetV3 (paper §6.4).

    Args:
        arch: "large" or "small".
        num_classes: classes (19 Cityscapes train ids).
        width_mult: backbone width multiplier.
        reduced_tail: halve the last stage (paper's RF2, used for its Cityscapes results).
        dilated: last stage dilated (output stride 16, the paper's default) or strided (32).
        pooling: LR-ASPP gate pooling, ``"global"`` (torchvision) or ``"paper"`` (49x49 window,
            stride (16, 20), clamped to the map; see :mod:`heads.lraspp`).
        weights: a full LR-ASPP checkpoint (torchvision's or ours) to start from.
        weights_backbone: an ImageNet MobileNetV3 checkpoint for the backbone (the paper trains
            from scratch; torchvision's recipe starts from ImageNet weights).
        low_tap: LR-ASPP low-level tap: any stride-8 backbone tap (``"stage3"`` = end of the
            stride-8 stage, the default; ``"stage3_first"`` = its first block, torchvision's;
            ``"block5"``, ``"stage4_expand"``, ...; see :func:`mnv3det.backbone.tap_info`) or
            ``None`` (automatic: the checkpoint's, torchvision's for its weights, else
            ``"stage3"``). Settable from a config (``model.init_args.low_tap``). The high tap
            is the last conv (the paper's; not configurable).
        lr: base learning rate (0.01 in mmsegmentation's LR-ASPP recipe at batch 16).
        momentum: SGD momentum.
        weight_decay: decay on conv weights (not on BatchNorm/biases).
        warmup_steps: linear warm-up steps before the poly decay.
        bn_momentum: BatchNorm running-statistics momentum for every BN layer; ``None`` keeps
            the model's (torchvision's 0.01 in the backbone, 0.1 in the head). Short runs from
            scratch (the demo, a few hundred steps) need 0.1, or the running statistics used
            in evaluation are still close to their initial values.
        ignore_index: label value ignored by loss and metric.
        val_window: ``(height, width)`` for sliding-window validation/test/predict, or ``None``
            for one pass over the full image.
        val_window_stride: step between windows (default: two thirds of ``val_window``).
        class_names: names for the IoU table (default: Cityscapes train-id names).
        print_table: print the per-class IoU table after each validation/test (rank 0 only).
        mean: the model's input normalisation mean (``lraspp(image_mean=...)``); ``None``
            (default) is ImageNet's or the checkpoint's. The model applies it: the task passes
            [0, 1] images straight to the model. Kept under this name so checkpoints of older
            versions (whose hyper-parameters hold it) load.
        std: the model's input normalisation std (``lraspp(image_std=...)``), as ``mean``.
        channels_last: weights and activations in NHWC memory format while fitting (default;
            as in :class:`~mnv3det.tasks.detection.DetectionTask`).
        train_autocast: ``"auto"`` (default: the training step in bf16 on a CPU with native
            bf16 when ``trainer.precision`` is ``32-true``), ``"bf16"`` or ``"off"``; the loss
            stays fp32 and evaluation follows the trainer (see :mod:`mnv3det.tasks.speed`).
        compile: ``torch.compile`` the model (in place; checkpoints unchanged) when the trainer
            sets it up. Compiling takes minutes on a CPU and pays off on long runs.
        nonfinite_loss: a NaN or infinite training loss: ``"raise"`` (default, stop with the
            step and the batch's image files) or ``"skip"`` (skip that step's backward pass and
            optimiser step; see :mod:`mnv3det.tasks.divergence`).
    """

    def __init__(
        self,
        arch: str = "large",
        num_classes: int = 19,
        width_mult: float = 1.0,
        reduced_tail: bool = True,
        dilated: bool = True,
        pooling: str = "global",
        weights: str | None = None,
        weights_backbone: str | None = None,
        low_tap: str | None = None,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 4e-5,
        warmup_steps: int = 0,
        bn_momentum: float | None = None,
        ignore_index: int = IGNORE_INDEX,
        val_window: tuple[int, int] | None = None,
        val_window_stride: tuple[int, int] | None = None,
        class_names: Sequence[str] | None = None,
        print_table: bool = True,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        channels_last: bool = True,
        train_autocast: str = "auto",
        compile: bool = False,
        nonfinite_loss: str = "raise",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_nonfinite_policy(nonfinite_loss, "SegmentationTask")
        if lr <= 0:
            raise ValueError(f"SegmentationTask: lr must be > 0, got {lr}")
        if val_window is not None and (len(val_window) != 2 or min(val_window) < 1):
            raise ValueError(
                f"SegmentationTask: val_window must be (height, width), got {val_window}"
            )
        self.model = lraspp(
            arch,
            num_classes=num_classes,
            width_mult=width_mult,
            reduced_tail=reduced_tail,
            dilated=dilated,
            pooling=pooling,
            weights=weights,
            weights_backbone=weights_backbone,
            low_tap=low_tap,
            image_mean=mean,
            image_std=std,
        )
        set_bn_momentum(self.model, bn_momentum, "SegmentationTask")
        prepare_for_training(self.model, "SegmentationTask", train_autocast)
        self._compiled = False
        if class_names is None:
            class_names = (
                CLASS_NAMES
                if num_classes == len(CLASS_NAMES)
                else [f"class{i}" for i in range(num_classes)]
            )
        self.class_names = tuple(class_names)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.val_window = None if val_window is None else tuple(int(v) for v in val_window)
        if val_window_stride is None and self.val_window is not None:
            val_window_stride = tuple(max(1, 2 * v // 3) for v in self.val_window)
        self.val_window_stride = val_window_stride
        self.val_metric = SegmentationMetrics(num_classes, ignore_index, self.class_names)
        self.test_metric = SegmentationMetrics(num_classes, ignore_index, self.class_names)
        # The evaluation loss as a metric: summed and counted over all processes, so under DDP
        # (where ranks may hold a different number of images) it equals one process's mean.
        self.eval_loss = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.last_results: dict[str, Any] = {}
        self.loaded_position: tuple[int | None, int | None] | None = None
        """``(epoch, global_step)`` of the checkpoint loaded by validate/test/predict."""
        """Results of the last validation/test (``iou``, ``miou``, ..., ``table``)."""

    # ----------------------------------------------------------------- model
    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, C, H, W)`` for ``[0, 1]`` images ``(N, 3, H, W)``."""
        return self.model(images)

    def infer(self, images: Tensor) -> Tensor:
        """Evaluation logits of ``[0, 1]`` images: one pass, or sliding windows (``val_window``)."""
        if self.val_window is None:
            return self.model(images)
        return sliding_window_logits(
            self.model, images, self.val_window, self.val_window_stride, self.num_classes
        )

    def configure_model(self) -> None:
        """``channels_last: true``: NHWC weights while fitting. ``compile: true``: compile the
        model once (Lightning calls this hook per stage)."""
        # Here rather than in on_fit_start: DDP lays out its gradient buckets by the parameters'
        # strides when it wraps the model, which happens between the two hooks.
        if (
            self.hparams.channels_last
            and self._trainer is not None
            and self.trainer.state.fn == "fit"
        ):
            set_memory_format([self.model], channels_last=True)
        if self.hparams.compile and not self._compiled:
            compile_modules([self.model])
            self._compiled = True

    def on_fit_end(self) -> None:
        """Back to NCHW, so the trained model computes as one rebuilt from its checkpoint."""
        if self.hparams.channels_last:
            set_memory_format([self.model], channels_last=False)

    # -------------------------------------------------------------- training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images, masks = batch
        # a copy of the BatchNorm statistics when a NaN step may be skipped
        buffers = buffers_before_step(self, self.hparams.nonfinite_loss)
        with step_autocast(self.hparams.train_autocast, self.device):
            logits = self(images)
        logits = logits.float()  # the loss in fp32 whatever the autocast
        if (masks != self.ignore_index).any():
            loss = F.cross_entropy(logits, masks, ignore_index=self.ignore_index)
        else:  # an all-ignore crop: no gradient signal, but not a NaN either
            loss = logits.sum() * 0.0
        # NaN/inf: stop naming the batch's files, or skip the step (mnv3det.tasks.divergence)
        policy = self.hparams.nonfinite_loss
        checked = checked_loss(self, loss, batch, batch_idx, policy, buffers)
        if checked is not loss:  # skipped: None (or a zero-gradient loss under DDP)
            return checked
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def model_description(self) -> dict[str, Any]:
        """The model's description (with its input normalisation) plus class names and label
        map (train id -> Cityscapes label id for the 19 Cityscapes classes)."""
        facts: dict[str, Any] = {"class_names": list(self.class_names)}
        if tuple(self.class_names) == CLASS_NAMES:
            facts["label_map"] = {i: int(v) for i, v in enumerate(TRAINID_TO_ID.tolist())}
        facts.update(datamodule_facts(self, self.num_classes))
        return {**self.model.description, **facts}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_position = (checkpoint.get("epoch"), checkpoint.get("global_step"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep the .ckpt loadable with weights_only=True (lraspp(weights=...), mnv3det export)
        # and store the model description (load_model rebuilds the exact model from it).
        make_checkpoint_safe(checkpoint)
        describe_in_checkpoint(checkpoint, self, self.model_description())

    def configure_optimizers(self) -> dict:
        total = int(self.trainer.estimated_stepping_batches)
        return sgd_with_schedule(
            self.model,
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
            total_steps=total,
            warmup_steps=self.hparams.warmup_steps,
            schedule="poly",
        )

    # ------------------------------------------------------------ evaluation
    def _eval_step(self, batch: tuple[Tensor, Tensor], metric: SegmentationMetrics, stage: str):
        images, masks = batch
        logits = self.infer(images)
        valid = masks != self.ignore_index
        if valid.any():
            loss = F.cross_entropy(logits, masks, ignore_index=self.ignore_index)
            self.eval_loss[stage].update(loss, weight=images.shape[0])
            self.log(f"{stage}/loss", self.eval_loss[stage])
        metric.update(logits, masks)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metric, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metric, "test")

    def _eval_epoch_end(self, metric: SegmentationMetrics, stage: str) -> None:
        # The confusion matrices of all processes summed (metric.confmat alone is this rank's).
        confmat = metric.global_confmat()
        results = metrics_from_confmat(confmat)
        confmat = confmat.cpu()
        metric.reset()
        sanity = self.trainer is not None and self.trainer.sanity_checking
        if not sanity:
            # The values are already global (identical on every rank); sync_dist=True only keeps
            # Lightning from warning about unsynchronised epoch-level logs under DDP.
            for key in ("miou", "miou_all", "pixel_acc", "mean_acc"):
                self.log(f"{stage}/{key}", results[key], sync_dist=True)
            for name, value in zip(self.class_names, results["iou"].tolist()):
                if value == value:  # absent classes (NaN) are not logged
                    self.log(f"{stage}/iou/{name.replace(' ', '_')}", value, sync_dist=True)
        table = format_iou_table(
            {k: v.cpu() for k, v in results.items()}, self.class_names, confmat
        )
        self.last_results = {
            **{k: v.detach().cpu() for k, v in results.items()},
            "confmat": confmat,
            "table": table,
        }
        if self.hparams.print_table and not sanity:
            epoch = f"epoch {self.current_epoch}, step {self.global_step}"
            if self.trainer.state.fn != "fit" and self.loaded_position is not None:
                # validate/test --ckpt_path: the trainer's counters start at 0, the
                # checkpoint's are what the numbers belong to
                epoch = "checkpoint epoch {}, step {}".format(*self.loaded_position)
            rank_zero_info(f"\n[{stage}] per-class IoU ({epoch}):\n{table}")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metric, "val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metric, "test")

    # --------------------------------------------------------------- predict
    def predict_step(self, batch: tuple[Tensor, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Train-id masks at the original image size, with the images for overlays.

        Returns:
            One dict per image: ``pred`` (``uint8 [H, W]`` train ids at ``orig_size``),
            ``image`` (``uint8 [H, W, 3]`` of the network input, unpadded), and the item's
            metadata (``file_name``, ``orig_size``, ``input_size``).
        """
        images, metas = batch
        if isinstance(metas, Tensor):  # a labelled split passed to predict: no file names
            metas = [{"file_name": f"batch{batch_idx:05d}_{i}.png"} for i in range(len(images))]
        logits = self.infer(images)
        out = []
        for i, meta in enumerate(metas):
            meta = dict(meta) if isinstance(meta, Mapping) else {"file_name": str(meta)}
            h, w = meta.get("input_size", images.shape[-2:])
            item_logits = logits[i : i + 1, :, :h, :w]
            image = images[i, :, :h, :w]
            orig = tuple(meta.get("orig_size", (h, w)))
            if orig != (h, w):
                item_logits = F.interpolate(
                    item_logits, size=orig, mode="bilinear", align_corners=False
                )
            pred = item_logits.argmax(dim=1)[0].to(torch.uint8).cpu()
            rgb = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()
            out.append({**meta, "pred": pred, "image": rgb})
        return out


__all__ = ["SegmentationTask", "sliding_window_logits"]
