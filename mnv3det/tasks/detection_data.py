"""LightningDataModule for COCO-format detection (SSDLite training and evaluation, paper §6.3).

``CocoDataModule`` wires :class:`mnv3det.data.coco.CocoDetection` (official COCO layout read with
pycocotools) and the SSD augmentation of :mod:`mnv3det.data.detection_transforms` into
DataLoaders that yield ``(list of image tensors, list of target dicts)`` (torchvision's detection
convention, :func:`mnv3det.data.coco.collate_detection`). Training images are augmented and
resized to ``size``; validation / test / predict images are left at their own size (the model
resizes internally and maps boxes back to the original pixels), so evaluation boxes are in the
pixels of the annotation file.

Data problems (images left out, annotations dropped, boxes clipped ...; see
:mod:`mnv3det.data.coco`) are reported once, at the end of ``fit``, ``validate``, ``test`` and
``predict`` by the data module's own ``teardown`` hook (:class:`mnv3det.tasks.data_report.DataReport`),
which prints a summary per data set and writes every problem, per file, to ``skipped.csv`` in the
run's log folder (``trainer.log_dir``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from mnv3det.data.batches import collate_stacked, images_to_float
from mnv3det.data.coco import (
    IMAGE_EXTENSIONS,
    CocoDataError,
    CocoDetection,
    DetectionImageFolder,
    collate_detection,
    load_annotation_file,
)
from mnv3det.data.detection_transforms import eval_transforms, train_transforms
from mnv3det.data.eval_sampling import eval_sampler
from mnv3det.data.loader_defaults import resolve_num_workers, resolve_pin_memory
from mnv3det.data.sampling import ResumableTrainData, default_seed
from mnv3det.data.seeding import seed_worker_transforms
from mnv3det.tasks.data_report import DataReport, report_train_plan

DEFAULT_SIZE = 320
"""Training input side of a data module used without a model (torchvision's SSDLite320)."""

__all__ = ["CocoDataModule"]


class CocoDataModule(ResumableTrainData, DataReport, L.LightningDataModule):
    """COCO-format detection data for Lightning.

    Args:
        root: data set folder in the official layout (``train2017/``, ``val2017/``,
            ``annotations/instances_{split}.json``).
        size: training input side (``int`` or ``(H, W)``); training images are augmented and
            resized to it. ``None`` (the configs' choice): the model's input size, asked from
            the task at setup (``DetectionTask.input_size``), so it is written once; 320 when
            the data module is used without a model.
        batch_size: images per batch per device (torchvision's recipe: 24 per GPU). As in
            torchvision's recipe, the incomplete last training batch of each epoch is left out
            (the ``[data] train:`` line at the start of training says how many images); a
            training set smaller than one batch is a
            :class:`~mnv3det.data.sampling.TrainSetTooSmallError`.
        num_workers: DataLoader worker processes (``None``: one per available CPU core, at
            most 8).
        label_map: ``"contiguous"`` (labels 1..K) or ``"torchvision91"`` (label == COCO category
            id, 91 classes: torchvision's checkpoints); see :mod:`mnv3det.data.coco`.
        train_split: training split / image folder name.
        val_split: validation split.
        test_split: test split (``None``: the validation split).
        predict_dir: folder of images for ``predict`` (``None``: the validation split's images,
            with their COCO image ids, so predictions can be evaluated).
        empty_images: ``"keep"`` training images without boxes as negatives, or ``"skip"`` them
            (validation / test always keep every image: COCOeval scores false positives on them).
        on_error: ``"raise"``: every problem the check at setup finds (unknown category or
            image ids, missing, unreadable or truncated images, image sizes disagreeing with the
            annotation file, duplicate image ids) is an error naming it and the fix. ``"skip"``:
            such images are left out of the index before sampling, such annotations out of the
            targets; everything left out is listed in ``skipped.csv`` in the run's log folder and
            summarised at the end of the run (see :mod:`mnv3det.data.coco`).
        augment: use the SSD augmentation for training (``False``: training images are used as
            they are, like validation ones).
        pin_memory: DataLoader ``pin_memory`` (``None``: only when CUDA is available).
        zoom_out_max_scale: largest zoom-out canvas ratio of the augmentation (SSD: 4).
        photometric: use the photometric distortion in the augmentation.
        seed: seed of the training order and augmentation (``None``: drawn from torch's
            generator at setup, so ``seed_everything`` makes runs repeatable). Each image's
            augmentation is a function of (seed, epoch, image), whatever the number of workers,
            so a resumed run (``--ckpt_path last``) equals an uninterrupted one
            (:mod:`mnv3det.data.sampling`).
        uint8_batches: training batches leave the loader as one uint8 ``(N, 3, H, W)`` tensor
            (a list when the sizes differ, as with ``augment: false``);
            :meth:`on_after_batch_transfer` scales them to [0, 1] on the training device and
            hands the training step the usual list of float images
            (:mod:`mnv3det.data.batches`): a quarter of the bytes between worker processes and
            to the GPU, the same values. A loop of your own over ``train_dataloader()`` calls
            ``on_after_batch_transfer(batch, 0)`` after moving the batch, or sets this to
            ``False`` (float images in [0, 1] in a list, as from the other loaders).
    """

    def __init__(
        self,
        root: str | Path,
        size: int | tuple[int, int] | None = None,
        batch_size: int = 24,
        num_workers: int | None = None,
        label_map: str = "contiguous",
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        predict_dir: str | Path | None = None,
        empty_images: str = "keep",
        on_error: str = "raise",
        augment: bool = True,
        pin_memory: bool | None = None,
        zoom_out_max_scale: float = 4.0,
        photometric: bool = True,
        seed: int | None = None,
        uint8_batches: bool = True,
    ) -> None:
        super().__init__()
        if label_map not in ("contiguous", "torchvision91"):
            raise ValueError(
                f"label_map must be 'contiguous' or 'torchvision91'; got {label_map!r}"
            )
        if size is not None and min((size, size) if isinstance(size, int) else size) < 32:
            raise ValueError(f"size must be at least 32 pixels; got {size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        # size: null (the model's size) is left out of the hyper-parameters: Lightning refuses
        # to log a ``size`` that differs between the model and the data module.
        self.save_hyperparameters(ignore=["size"] if size is None else None)
        self.root = Path(root)
        self.size = size
        self.batch_size = batch_size
        self.num_workers = resolve_num_workers(num_workers)
        self.label_map = label_map
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.predict_dir = Path(predict_dir) if predict_dir is not None else None
        self.empty_images = empty_images
        self.on_error = on_error
        self.augment = augment
        self.pin_memory = resolve_pin_memory(pin_memory)
        self.zoom_out_max_scale = zoom_out_max_scale
        self.photometric = photometric
        self.seed = seed
        self.uint8_batches = uint8_batches
        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None
        self.test_dataset: CocoDetection | None = None
        self.predict_dataset: Dataset | None = None
        self._categories: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ label space
    def _category_list(self) -> list[dict[str, Any]]:
        """The categories of the validation (else training) annotation file, read once."""
        if self._categories is None:
            for dataset in (self.val_dataset, self.train_dataset):
                if dataset is not None:
                    self._categories = list(dataset.coco.cats.values())
                    break
            else:
                for split in (self.val_split, self.train_split):
                    ann_file = self.root / "annotations" / f"instances_{split}.json"
                    if ann_file.is_file():
                        self._categories = list(load_annotation_file(ann_file)["categories"])
                        break
                else:
                    raise FileNotFoundError(
                        f"no annotation file under {self.root / 'annotations'} for "
                        f"{self.val_split!r} or {self.train_split!r}; expected the COCO layout "
                        "root/annotations/instances_{split}.json"
                    )
        return self._categories

    @property
    def num_classes(self) -> int:
        """Classes including background: 91 for ``torchvision91``, else categories + 1."""
        if self.label_map == "torchvision91":
            return 91
        return len(self._category_list()) + 1

    @property
    def label_to_cat_id(self) -> dict[int, int]:
        """Model label -> COCO category id (for results files and COCOeval)."""
        cats = sorted(int(c["id"]) for c in self._category_list())
        if self.label_map == "torchvision91":
            return {c: c for c in cats}
        return {i + 1: c for i, c in enumerate(cats)}

    @property
    def class_names(self) -> list[str]:
        """Name of each label (index 0: background; unused torchvision91 slots: ``"N/A"``)."""
        names = ["N/A"] * self.num_classes
        names[0] = "__background__"
        by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in self._category_list()}
        for label, cat_id in self.label_to_cat_id.items():
            names[label] = by_id[cat_id]
        return names

    # ------------------------------------------------------------------ data sets
    def training_size(self) -> int | tuple[int, int]:
        """``size``; else the input size of the model being trained (asked through the trainer);
        else 320 (SSDLite320, for a data module used on its own)."""
        if self.size is not None:
            return self.size
        trainer = getattr(self, "trainer", None)
        model_size = getattr(getattr(trainer, "lightning_module", None), "input_size", None)
        return model_size if model_size is not None else DEFAULT_SIZE

    def _dataset(self, split: str, train: bool) -> CocoDetection:
        if train and self.augment:
            if self.seed is None:
                self.seed = default_seed()
            transforms = train_transforms(
                self.training_size(),
                zoom_out_max_scale=self.zoom_out_max_scale,
                photometric=self.photometric,
                seed=self.seed,
            )
        else:
            transforms = eval_transforms()
        return CocoDetection(
            self.root,
            split=split,
            transforms=transforms,
            label_map=self.label_map,
            empty_images=self.empty_images if train else "keep",
            on_error=self.on_error,
            uint8_images=train and self.uint8_batches,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the data sets ``stage`` needs (``fit``/``validate``/``test``/``predict``)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_split, train=True)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_split, train=False)
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self._dataset(self.test_split or self.val_split, train=False)
        if stage in (None, "predict") and self.predict_dataset is None:
            self.predict_dataset = self._predict_dataset()
        self._check_same_label_space()
        self._reported_stage = None  # report this run once, at its end (DataReport)

    def datasets_in_use(self, stage: str) -> list[Dataset]:
        """The data sets ``stage`` (``fit``/``validate``/``test``/``predict``) reads, built ones
        only (for :class:`~mnv3det.tasks.data_report.DataReport`)."""
        names = {
            "fit": ("train_dataset", "val_dataset"),
            "validate": ("val_dataset",),
            "test": ("test_dataset",),
            "predict": ("predict_dataset",),
        }.get(stage, ())
        return [d for d in (getattr(self, n) for n in names) if d is not None]

    def _check_same_label_space(self) -> None:
        datasets = [d for d in (self.train_dataset, self.val_dataset, self.test_dataset) if d]
        for other in datasets[1:]:
            if other.label_to_cat_id != datasets[0].label_to_cat_id:
                raise CocoDataError(
                    f"{datasets[0].ann_file} and {other.ann_file} define different categories "
                    f"({sorted(datasets[0].cat_id_to_label)} vs {sorted(other.cat_id_to_label)}), "
                    "so their labels would not mean the same classes; use annotation files with "
                    "the same 'categories' list"
                )

    def _coco_split_images(self, folder: Path) -> tuple[Path, dict[str, int]] | None:
        """``(annotation file, file_name -> COCO image id)`` when ``folder`` is a COCO split's
        image folder, else ``None``.

        A split's image folder is ``root/{split}`` (the train/val/test split, or the folder's own
        name) or, for a folder elsewhere, ``DIR/{name}`` beside ``DIR/annotations/
        instances_{name}.json``; either way its annotation file must exist.
        """
        folder = folder.resolve()
        splits = (self.val_split, self.train_split, self.test_split, folder.name)
        candidates = [(self.root, split) for split in dict.fromkeys(s for s in splits if s)]
        candidates.append((folder.parent, folder.name))
        for root, split in candidates:
            ann_file = root / "annotations" / f"instances_{split}.json"
            if not ann_file.is_file() or not (root / split).is_dir():
                continue
            if (root / split).resolve() != folder:
                continue
            try:
                with open(ann_file) as f:
                    images = json.load(f).get("images", [])
                ids = {str(im["file_name"]): int(im["id"]) for im in images}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise CocoDataError(
                    f"cannot read the images of COCO annotation file {ann_file}: "
                    f"{type(err).__name__}: {err}"
                ) from err
            if len(ids) != len(images):
                raise CocoDataError(
                    f"{ann_file} lists the same file_name under more than one image id, so "
                    "predictions could not be told apart"
                )
            return ann_file, ids
        return None

    def _predict_dataset(self) -> Dataset:
        """The images to predict, with COCO image ids when they are a COCO split.

        ``predict_dir`` unset: the validation split's images. ``predict_dir`` a COCO split's image
        folder (see :meth:`_coco_split_images`): the images its annotation file lists, with their
        COCO ids (files it does not list are left out and counted). Any other folder: every image
        in it and its sub-folders, with the position in the sorted list of relative paths as id.
        """
        if self.predict_dir is not None:
            split = self._coco_split_images(self.predict_dir)
            if split is None:
                return DetectionImageFolder(self.predict_dir, on_error=self.on_error)
            ann_file, ids = split
            on_disk = {
                p.relative_to(self.predict_dir).as_posix()
                for p in self.predict_dir.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            }
            unlisted = len(on_disk - set(ids))
            note = f" ({unlisted} image files it does not list are left out)" if unlisted else ""
            rank_zero_info(
                f"[data] predicting the COCO split {self.predict_dir} with the image ids of "
                f"{ann_file}{note}"
            )
            files = sorted(ids, key=ids.__getitem__)
            return DetectionImageFolder(
                self.predict_dir, files=files, image_ids=ids, on_error=self.on_error
            )
        coco_split = self.val_dataset or self._dataset(self.val_split, train=False)
        files = [coco_split.coco.imgs[i]["file_name"] for i in coco_split.ids]
        ids = {coco_split.coco.imgs[i]["file_name"]: int(i) for i in coco_split.ids}
        return DetectionImageFolder(
            coco_split.image_dir, files=files, image_ids=ids, on_error=self.on_error
        )

    # ------------------------------------------------------------------ loaders
    def _eval_loader(self, dataset: Dataset | None, name: str) -> DataLoader:
        """Validation, test and predict loader: every image once, in order."""
        if dataset is None:
            raise RuntimeError(f"{name} data set is not set up; call setup() with the right stage")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # under DDP every image is evaluated once, on one process (no padded repeats)
            sampler=eval_sampler(dataset, name),
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=seed_worker_transforms if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("train data set is not set up; call setup('fit') first")
        # the incomplete last batch is left out (as torchvision's recipe): SSDLite's 1x1 extra
        # layers' BatchNorm fails on one image; a set smaller than a batch is an error
        return self.make_train_loader(
            self.train_dataset,
            self.batch_size,
            report=report_train_plan,
            num_workers=self.num_workers,
            collate_fn=collate_stacked if self.uint8_batches else collate_detection,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Scale uint8 training images to float32 in [0, 1] where the batch now is (Lightning
        calls this after moving every batch to the device) and hand them on as a list of
        ``(3, H, W)`` images, torchvision's detection convention, like every other loader's
        batches (which pass unchanged)."""
        images, *rest = batch
        images = images_to_float(images)
        if isinstance(images, torch.Tensor):
            images = list(images.unbind(0))
        return (images, *rest)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset, name="val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset, name="test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_dataset, name="predict")

    def report_stats(self) -> str:
        """The summaries of every data set set up so far (printed at the end of a run)."""
        lines = [
            d.stats.report()
            for d in (self.train_dataset, self.val_dataset, self.test_dataset)
            if d is not None
        ]
        return "\n".join(lines)
