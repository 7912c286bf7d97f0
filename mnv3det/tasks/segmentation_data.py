"""LightningDataModule for Cityscapes semantic segmentation (LR-ASPP, paper §6.4).

Configs name it ``mnv3det.tasks.segmentation_data.CityscapesDataModule``; with
``--data.root /data/cityscapes`` it reads the official layout (see
:mod:`mnv3det.data.cityscapes`), trains on random-scaled, padded, flipped and jittered crops
(:mod:`mnv3det.data.segmentation_transforms`) and validates on full images. The same module
reads the generated street scenes of :mod:`mnv3det.data.synthetic_cityscapes` for the demo.

Every image/label pair is checked at setup (``on_error``, see :mod:`mnv3det.data.cityscapes`);
what was left out is summarised at the end of the run and listed in ``skipped.csv`` in the run's
log folder (:class:`mnv3det.tasks.data_report.DataReport`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from mnv3det.data.cityscapes import (
    CityscapesDataError,
    CityscapesSegmentation,
    SegmentationImageFolder,
    collate_segmentation,
)
from mnv3det.data.cityscapes_labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, PALETTE
from mnv3det.data.eval_sampling import eval_sampler
from mnv3det.data.loader_defaults import resolve_num_workers, resolve_pin_memory
from mnv3det.data.sampling import ResumableTrainData
from mnv3det.data.seeding import seed_worker_transforms
from mnv3det.data.segmentation_transforms import eval_transforms, train_transforms
from mnv3det.tasks.data_report import DataReport, report_train_plan


class CityscapesDataModule(ResumableTrainData, DataReport, L.LightningDataModule):
    """Cityscapes train/val/test/predict loaders.

    Train and validation items are ``(image FloatTensor[3, H, W] in [0, 1], mask
    LongTensor[H, W])`` with train ids 0..18 and 255 ignored; batches are
    ``(images [N, 3, H, W], masks [N, H, W])`` (mixed-size validation images are padded with 0 /
    mask 255, see :func:`mnv3det.data.cityscapes.collate_segmentation`). Predict batches are
    ``(images, [{"file_name", "orig_size", "input_size"}, ...])`` from ``predict_dir``.

    Args:
        root: Cityscapes root (holds ``leftImg8bit/`` and ``gtFine/``).
        crop_size: ``(height, width)`` training crop; 512x1024 as in mmsegmentation's LR-ASPP.
        scale_range: random rescale range before cropping (0.5-2.0 in the published recipes).
        batch_size: training batch size (per device).
        num_workers: DataLoader workers (``None``: one per available CPU core, at most 8).
        train_split: split folder for training.
        val_split: split folder for validation.
        test_split: split folder for ``test`` (``None``: ``mnv3det test`` is refused with a
            clear error; Cityscapes' own test labels are withheld, so usually predict instead).
        val_resize: optional ``(height, width)`` to resize validation/test/predict images to
            (demos; the benchmark evaluates at full size, ``None``).
        predict_dir: folder of images for ``predict`` (searched recursively).
        label_type: ``"auto"`` (prefer ``*_labelTrainIds.png``), ``"labelIds"`` or
            ``"labelTrainIds"``.
        pin_memory: pin host memory for faster transfer to a GPU (``None``: only when CUDA
            is available).
        val_batch_size: validation/test/predict batch size (default: ``batch_size``).
        hflip_p: horizontal flip probability in training.
        color_jitter: photometric jitter strength in training (0 disables it).
        seed: seed of the training order and augmentation (``None``: drawn from torch's
            generator at setup, so ``seed_everything`` makes runs repeatable). Each image's
            augmentation is a function of (seed, epoch, image), so a resumed run
            (``--ckpt_path last``) equals an uninterrupted one (:mod:`mnv3det.data.sampling`).
        on_error: ``"raise"``: a missing or unreadable image or label file, an image and label
            of different sizes or label values outside the known ids is an error at setup naming
            the files and the fix. ``"skip"``: such pairs (and unreadable prediction images) are
            left out before sampling, listed in ``skipped.csv`` in the run's log folder and
            summarised at the end of the run.
    """

    def __init__(
        self,
        root: str | Path,
        crop_size: tuple[int, int] = (512, 1024),
        scale_range: tuple[float, float] = (0.5, 2.0),
        batch_size: int = 8,
        num_workers: int | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        val_resize: tuple[int, int] | None = None,
        predict_dir: str | Path | None = None,
        label_type: Literal["auto", "labelIds", "labelTrainIds"] = "auto",
        pin_memory: bool | None = None,
        val_batch_size: int | None = None,
        hflip_p: float = 0.5,
        color_jitter: float = 0.3,
        seed: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(
                f"batch_size and val_batch_size must be >= 1, got {batch_size}, {val_batch_size}"
            )
        self.save_hyperparameters()
        self.root = Path(root)
        self.crop_size = tuple(crop_size)
        self.scale_range = tuple(scale_range)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = resolve_num_workers(num_workers)
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.val_resize = None if val_resize is None else tuple(val_resize)
        self.predict_dir = None if predict_dir is None else Path(predict_dir)
        self.label_type = label_type
        self.pin_memory = resolve_pin_memory(pin_memory)
        self.hflip_p = hflip_p
        self.color_jitter = color_jitter
        self.seed = seed
        self.on_error = on_error
        self._train: CityscapesSegmentation | None = None
        self._val: CityscapesSegmentation | None = None
        self._test: CityscapesSegmentation | None = None
        self._predict: SegmentationImageFolder | None = None

    # Metadata the task and the demo read (no data needs to exist for these).
    num_classes: int = NUM_CLASSES
    class_names: tuple[str, ...] = CLASS_NAMES
    ignore_index: int = IGNORE_INDEX
    palette = PALETTE

    @property
    def train_dataset(self) -> CityscapesSegmentation:
        """The training split with the random-crop pipeline (built on first use)."""
        if self._train is None:
            self._train = CityscapesSegmentation(
                self.root,
                self.train_split,
                transforms=train_transforms(
                    self.crop_size,
                    self.scale_range,
                    hflip_p=self.hflip_p,
                    color_jitter=self.color_jitter,
                ),
                label_type=self.label_type,
                on_error=self.on_error,
            )
        return self._train

    @property
    def val_dataset(self) -> CityscapesSegmentation:
        """The validation split on full (or ``val_resize``d) images (built on first use)."""
        if self._val is None:
            self._val = self._eval_dataset(self.val_split)
        return self._val

    @property
    def test_dataset(self) -> CityscapesSegmentation:
        """The ``test_split`` with labels, evaluated like validation.

        Raises:
            CityscapesDataError: no ``test_split`` was configured.
        """
        if self._test is None:
            if self.test_split is None:
                raise CityscapesDataError(
                    "CityscapesDataModule has no test_split; set --data.test_split (a split "
                    "folder with labels, e.g. 'val'), or use 'predict' with --data.predict_dir"
                )
            self._test = self._eval_dataset(self.test_split)
        return self._test

    @property
    def predict_dataset(self) -> SegmentationImageFolder:
        """Images of ``predict_dir`` (resized to ``val_resize`` when set).

        Raises:
            ValueError: no ``predict_dir`` was configured.
        """
        if self._predict is None:
            if self.predict_dir is None:
                raise ValueError(
                    "CityscapesDataModule has no predict_dir; set --data.predict_dir to a folder "
                    "of images (e.g. ROOT/leftImg8bit/test)"
                )
            self._predict = SegmentationImageFolder(
                self.predict_dir, resize=self.val_resize, on_error=self.on_error
            )
        return self._predict

    def _eval_dataset(self, split: str) -> CityscapesSegmentation:
        return CityscapesSegmentation(
            self.root,
            split,
            transforms=eval_transforms(self.val_resize),
            label_type=self.label_type,
            on_error=self.on_error,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build (and so validate the layout of) the data sets the stage needs."""
        if stage in (None, "fit"):
            _ = self.train_dataset, self.val_dataset
        if stage == "validate":
            _ = self.val_dataset
        if stage == "test":
            _ = self.test_dataset
        if stage == "predict":
            _ = self.predict_dataset
        self._reported_stage = None  # report this run once, at its end (DataReport)

    def datasets_in_use(self, stage: str) -> list[Dataset]:
        """The data sets ``stage`` (``fit``/``validate``/``test``/``predict``) reads, built ones
        only (for :class:`~mnv3det.tasks.data_report.DataReport`)."""
        built = {
            "fit": (self._train, self._val),
            "validate": (self._val,),
            "test": (self._test,),
            "predict": (self._predict,),
        }.get(stage, ())
        return [d for d in built if d is not None]

    def _eval_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """Validation, test and predict loader: every image once, in order."""
        return DataLoader(
            dataset,
            batch_size=batch_size,
            # under DDP every image is evaluated once, on one process (no padded repeats)
            sampler=eval_sampler(dataset),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=seed_worker_transforms,
            collate_fn=collate_segmentation,
        )

    def train_dataloader(self) -> DataLoader:
        return self.make_train_loader(
            self.train_dataset,
            self.batch_size,
            # the incomplete last batch is left out (BN dislikes a tiny batch), but a set smaller
            # than a batch trains as one: LR-ASPP's BatchNorm sees every pixel of the crop
            short_set="one_batch",
            report=report_train_plan,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_segmentation,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset, self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset, self.val_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_dataset, self.val_batch_size)

    @staticmethod
    def class_table(values: Sequence[float]) -> list[tuple[str, float]]:
        """Pair per-class values (e.g. IoU) with the Cityscapes class names."""
        if len(values) != NUM_CLASSES:
            raise ValueError(f"expected {NUM_CLASSES} per-class values, got {len(values)}")
        return list(zip(CLASS_NAMES, (float(v) for v in values)))
