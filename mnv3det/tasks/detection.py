"""LightningModule for SSDLite-MobileNetV3 detection on COCO (paper §6.3, Table 6).

Configs name it ``mnv3det.tasks.detection.DetectionTask`` together with
:class:`mnv3det.tasks.detection_data.CocoDataModule`:

* the model is :func:`mnv3det.ssdlite` (arch, width, reduced tail, input size, torchvision /
  ImageNet weights). Batches are ``(list of [0, 1] images, list of targets)``; the model
  normalises and resizes internally, so validation images keep their own size and the boxes it
  returns are in the pixels of the annotation file;
* training: SSD multibox loss (``train/bbox_regression``, ``train/classification``,
  ``train/loss``), SGD with linear warm-up then cosine decay per step, no weight decay on
  BatchNorm/biases (torchvision's SSDLite recipe, :func:`mnv3det.tasks.optim.sgd_with_schedule`),
  optional EMA of the weights (then validation, test and predict use the EMA weights); fast
  by default: channels_last weights, bf16 autocast of the training step on a CPU with native
  bf16, a fused SGD step (:mod:`mnv3det.tasks.speed`; ``compile: true`` adds torch.compile);
* validation/test: pycocotools ``COCOeval`` on the data set's own annotation file, with every
  rank's detections gathered first (:class:`mnv3det.metrics.coco.CocoMetric`); all 12 numbers are
  logged as ``val/map``, ``val/map_50``, ... (``val/map`` = AP@[.5:.95] is what checkpoints
  monitor); the COCO table is printed after ``validate``/``test`` (rank 0);
* predict: detections per image (boxes in original pixels plus ``image_id`` / ``file_name``),
  written as a COCO results JSON (and optionally pictures) by
  :class:`mnv3det.tasks.detection_writer.DetectionPredictionWriter`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mnv3det.metrics.coco import STAT_NAMES, CocoCurves, CocoMetric
from mnv3det.models.ssdlite import SSDLite, ssdlite
from mnv3det.tasks.checkpoints import make_checkpoint_safe
from mnv3det.tasks.description import datamodule_facts, describe_in_checkpoint
from mnv3det.tasks.divergence import (
    buffers_before_step,
    check_nonfinite_policy,
    checked_loss,
)
from mnv3det.tasks.optim import make_ema, set_bn_momentum, sgd_with_schedule
from mnv3det.tasks.speed import (
    compile_modules,
    prepare_for_training,
    set_memory_format,
    step_autocast,
)
from mnv3det.weights import DESCRIPTION_KEY

__all__ = ["DetectionTask"]


Batch = tuple[Sequence[Tensor], Sequence[dict[str, Any]]]


class DetectionTask(L.LightningModule):
    """Train and evaluate SSDLite-MobileNetV3 (paper §6.3).

    Args:
        arch: "large" or "small".
        num_classes: classes including background: 91 for COCO in torchvision's layout
            (``label_map: torchvision91``), 81 for contiguous COCO labels, K + 1 in general. Must
            equal the data module's ``num_classes`` (checked at setup).
        size: network input side (torchvision 320; 512 / 640 work, default boxes follow).
        width_mult: backbone and extra-block width multiplier.
        reduced_tail: halve the last backbone stage (paper's "†"); torchvision uses it when the
            backbone is trained from scratch, and its published COCO checkpoint is reduced-tail.
        weights: whole-detector checkpoint to start from (torchvision's
            ``ssdlite320_mobilenet_v3_large`` file, one of ours, or a DetectionTask ``.ckpt``).
        weights_backbone: ImageNet MobileNetV3 checkpoint (torchvision/timm file).
        score_thresh: minimum detection score (torchvision 0.001, for mAP).
        nms_thresh: NMS IoU threshold (0.55).
        detections_per_img: detections kept per image (300).
        topk_candidates: candidates per class before NMS (300).
        lr: base learning rate (torchvision: 0.15 for 8 GPUs x 24 images).
        momentum: SGD momentum (0.9).
        weight_decay: weight decay on conv weights (4e-5), none on BatchNorm/biases.
        warmup_epochs: linear warm-up length in epochs (5), converted to steps.
        schedule: "cosine" (torchvision's recipe) or "poly".
        ema_decay: EMA decay per step (e.g. 0.9998), or ``None`` for no EMA.
        bn_momentum: BatchNorm momentum of every layer, or ``None`` to keep SSDLite's 0.03.
            Very short runs (the demo) need a larger value (e.g. 0.1) so that the running
            statistics used at evaluation catch up with the weights.
        print_table: print pycocotools' table after ``validate``/``test`` (rank 0).
        channels_last: while fitting (training and its validations), keep the model's weights,
            hence its activations, in channels_last (NHWC) memory format: faster convolutions
            and BatchNorm on CPUs (oneDNN) and on GPUs under mixed precision. The model is
            NCHW again after ``fit``; checkpoints are the same either way.
        train_autocast: autocast of the training step when the trainer does not autocast
            itself (``trainer.precision: 32-true``): ``"auto"`` (bf16 on a CPU with native
            bf16, AVX512-BF16 or AMX; nothing on a GPU, where ``trainer.precision`` decides),
            ``"bf16"`` or ``"off"`` (fp32). Under CPU autocast the depthwise convolutions
            stay fp32 (:mod:`mnv3det.tasks.speed`). Validation, test and predict run as the
            trainer says, fp32 by default.
        compile: ``torch.compile`` the backbone, extra blocks and heads (in place; checkpoints
            unchanged) when the trainer sets the model up. Compiling takes minutes on a CPU and
            pays off on long runs (GPU above all).
        nonfinite_loss: a NaN or infinite training loss: ``"raise"`` (default, stop with the
            step and the batch's image files) or ``"skip"`` (skip that step's backward pass and
            optimiser step; see :mod:`mnv3det.tasks.divergence`).
    """

    def __init__(
        self,
        arch: str = "large",
        num_classes: int = 91,
        size: int = 320,
        width_mult: float = 1.0,
        reduced_tail: bool = False,
        weights: str | None = None,
        weights_backbone: str | None = None,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.55,
        detections_per_img: int = 300,
        topk_candidates: int = 300,
        lr: float = 0.15,
        momentum: float = 0.9,
        weight_decay: float = 4e-5,
        warmup_epochs: float = 5.0,
        schedule: str = "cosine",
        ema_decay: float | None = None,
        bn_momentum: float | None = None,
        print_table: bool = True,
        channels_last: bool = True,
        train_autocast: str = "auto",
        compile: bool = False,
        nonfinite_loss: str = "raise",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_nonfinite_policy(nonfinite_loss, "DetectionTask")
        if lr <= 0:
            raise ValueError(f"DetectionTask: lr must be > 0, got {lr}")
        if warmup_epochs < 0:
            raise ValueError(f"DetectionTask: warmup_epochs must be >= 0, got {warmup_epochs}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"DetectionTask: ema_decay must be in (0, 1) or null, got {ema_decay}")
        self.model: SSDLite = ssdlite(
            arch,
            num_classes=num_classes,
            size=size,
            width_mult=width_mult,
            reduced_tail=reduced_tail,
            weights=weights,
            weights_backbone=weights_backbone,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        set_bn_momentum(self.model, bn_momentum, "DetectionTask")
        # the prediction heads (box offsets, class logits) stay fp32 under CPU autocast: in bf16
        # the demo's AP fell by 3 points
        prepare_for_training(self.model, "DetectionTask", train_autocast, float32=[self.model.head])
        self._compiled = False
        self.ema = None
        if ema_decay is not None:
            self.ema = make_ema(self.model, ema_decay)
            self.ema.requires_grad_(False)  # updated by averaging, never by the optimiser
        self._coco_metrics: dict[str, CocoMetric] = {}
        self.last_results: dict[str, dict[str, float]] = {}
        """Results of the last validation/test per stage (the 12 COCO numbers)."""
        self.last_summary = ""
        self.last_curves: dict[str, CocoCurves | None] = {}
        """COCOeval's precision array of the last validation/test per stage (PR curves, AP per
        class: :class:`mnv3det.tasks.plots.PlotWriter` draws them)."""
        self.data_facts: dict[str, Any] = {}
        """``label_map`` / ``class_names`` read from a loaded checkpoint (see ``on_load_checkpoint``)."""
        """pycocotools' printed table of the last validation/test."""

    # ----------------------------------------------------------------- model
    @property
    def eval_model(self) -> SSDLite:
        """The weights used for evaluation and prediction: the EMA ones when enabled."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def input_size(self) -> tuple[int, int]:
        """The network input ``(H, W)``; the data module resizes training images to it."""
        return tuple(self.model.size)

    def forward(self, images: Sequence[Tensor] | Tensor) -> list[dict[str, Tensor]]:
        """Detections (eval mode) of ``[0, 1]`` images of any size."""
        return self.eval_model(images)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        try:
            classes = getattr(dm, "num_classes", None) if dm is not None else None
        except (OSError, ValueError):
            # No annotation file to count classes from (e.g. predict on a plain folder with a
            # checkpoint): nothing to check here; fit/validate report the missing file anyway.
            classes = None
        if isinstance(classes, int) and classes != self.hparams.num_classes:
            raise ValueError(
                f"DetectionTask: model.num_classes={self.hparams.num_classes} but the data "
                f"module has {classes} classes (background included; label_map="
                f"{getattr(dm, 'label_map', '?')!r}); set model.init_args.num_classes: {classes}, "
                "or (with --ckpt_path) the data.label_map the checkpoint was trained with"
            )
        data_size = getattr(dm, "size", None) if dm is not None else None
        if isinstance(data_size, int):
            data_size = (data_size, data_size)
        if data_size is not None and tuple(data_size) != self.input_size:
            raise ValueError(
                f"DetectionTask: model.size={self.hparams.size} (with --ckpt_path: the size the "
                f"checkpoint was trained with) but data.size={data_size}; pass --data.size "
                f"{self.hparams.size}"
            )

    def configure_model(self) -> None:
        """``channels_last: true``: NHWC weights (and EMA weights) while fitting. ``compile:
        true``: compile the network (backbone, extra blocks, heads) once; the pre-processing and
        the loss (data-dependent shapes) stay eager."""
        # Here rather than in on_fit_start: DDP lays out its gradient buckets by the parameters'
        # strides when it wraps the model, which happens between the two hooks.
        if (
            self.hparams.channels_last
            and self._trainer is not None
            and self.trainer.state.fn == "fit"
        ):
            set_memory_format([self.model, self.ema], channels_last=True)
        if self.hparams.compile and not self._compiled:
            compile_modules([self.model.backbone, self.model.extra, self.model.head])
            self._compiled = True

    def on_fit_end(self) -> None:
        """Back to NCHW, so the trained model computes as one rebuilt from its checkpoint."""
        if self.hparams.channels_last:
            set_memory_format([self.model, self.ema], channels_last=False)

    # -------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        images, targets = batch
        # a copy of the BatchNorm statistics when a NaN step may be skipped
        buffers = buffers_before_step(self, self.hparams.nonfinite_loss)
        with step_autocast(self.hparams.train_autocast, self.device):
            losses = self.model(list(images), list(targets))
        loss = losses["bbox_regression"] + losses["classification"]
        # NaN/inf: stop naming the batch's files, or skip the step (mnv3det.tasks.divergence)
        policy = self.hparams.nonfinite_loss
        checked = checked_loss(self, loss, batch, batch_idx, policy, buffers)
        if checked is not loss:  # skipped: None (or a zero-gradient loss under DDP)
            return checked
        n = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/bbox_regression", losses["bbox_regression"], batch_size=n)
        self.log("train/classification", losses["classification"], batch_size=n)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # The EMA follows every optimiser step here, not in on_train_batch_end: that hook runs
        # after the callbacks', so a checkpoint saved mid-epoch would miss one EMA update.
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def configure_optimizers(self) -> dict:
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)
        per_epoch = trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)
        if not math.isfinite(per_epoch) or per_epoch <= 0:
            per_epoch = total / max(1, trainer.max_epochs or 1)
        warmup = min(total, round(self.hparams.warmup_epochs * per_epoch))
        return sgd_with_schedule(
            self.model,
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
            total_steps=total,
            warmup_steps=warmup,
            schedule=self.hparams.schedule,
        )

    # ------------------------------------------------------------ evaluation
    def _coco_dataset(self, stage: str) -> Any:
        """The data set whose annotation file evaluates ``stage`` ("val" or "test")."""
        dm = getattr(self.trainer, "datamodule", None)
        dataset = getattr(dm, f"{stage}_dataset", None) if dm is not None else None
        if dataset is None:
            loaders = (
                self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
            )
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "coco"):
            raise ValueError(
                f"DetectionTask: the {stage} data set must be a COCO data set with a `.coco` "
                "(pycocotools COCO) attribute and `.label_to_cat_id`, e.g. "
                "mnv3det.data.coco.CocoDetection / CocoDataModule"
            )
        return dataset

    def _metric(self, stage: str) -> CocoMetric:
        if stage not in self._coco_metrics:
            dataset = self._coco_dataset(stage)
            metric = CocoMetric(dataset.coco, getattr(dataset, "label_to_cat_id", None))
            self._coco_metrics[stage] = metric.to(self.device)
        return self._coco_metrics[stage]

    def _eval_step(self, batch: Batch, stage: str) -> None:
        images, targets = batch
        self._metric(stage).update(self.eval_model(list(images)), targets)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        metric = self._coco_metrics.get(stage)
        if metric is None:
            return
        stats = metric.compute()  # gathers every rank's detections, then COCOeval
        self.last_summary = metric.summary
        self.last_curves[stage] = metric.curves
        metric.reset()
        self.last_results[stage] = stats
        for name in STAT_NAMES:
            # identical on every rank already; sync_dist only keeps Lightning's DDP check quiet
            self.log(f"{stage}/{name}", stats[name], sync_dist=True, prog_bar=name == "map")
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if self.hparams.print_table and not fitting:
            rank_zero_info(
                f"COCO {stage} ({len(metric.coco_gt.imgs)} images in file):\n{metric.summary}"
            )

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # --------------------------------------------------------------- predict
    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        """Per image ``{"boxes", "scores", "labels"}`` (CPU, original pixels) plus the batch's
        metadata (``image_id``, ``file_name``, ``orig_size`` when the data set gives them)."""
        images, metas = batch
        detections = self.eval_model(list(images))
        out = []
        for det, meta in zip(detections, metas, strict=True):
            item = {k: v for k, v in meta.items() if k not in ("boxes", "labels")}
            item.update({k: v.detach().cpu() for k, v in det.items()})
            out.append(item)
        return out

    def model_description(self) -> dict[str, Any]:
        """The model's description plus the data module's ``label_map`` and ``class_names``."""
        return {
            **self.model.description,
            **self.data_facts,
            **datamodule_facts(self, self.model.num_classes),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The label map and class names the checkpoint was trained with: predict writes COCO
        # category ids with them when the data module has no annotation file to read.
        description = checkpoint.get(DESCRIPTION_KEY) or {}
        self.data_facts = {
            k: description[k] for k in ("label_map", "class_names") if k in description
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep the .ckpt loadable with torch.load(weights_only=True) (mnv3det.weights refuses
        # anything else): hyper-parameters may hold Paths (e.g. the data module's root). Store
        # the model description (load_model rebuilds the exact model from it).
        make_checkpoint_safe(checkpoint)
        describe_in_checkpoint(checkpoint, self, self.model_description())

    @classmethod
    def weights_from_checkpoint(cls, path: str | Path) -> SSDLite:
        """Rebuild the SSDLite of a DetectionTask checkpoint (EMA weights when it has them).

        An alias of :func:`mnv3det.models.from_checkpoint.load_model` (eval mode).
        """
        from mnv3det.models.from_checkpoint import load_model

        return load_model(path, builder="ssdlite")
