"""The Cityscapes label table: label ids, the 19 train ids, names, categories and colours.

Transcribed from the official ``cityscapesscripts/helpers/labels.py`` (Cordts et al., 2016),
the table the benchmark server and every published Cityscapes number (including the LR-ASPP
results of the MobileNetV3 paper, §6.4, Tables 7-8) are defined by. Ground truth files
(``*_gtFine_labelIds.png``) store the ``id`` column; training and the 19-class mIoU use the
``train_id`` column, with everything not among the 19 evaluated classes mapped to 255 (ignored).
Predictions for the benchmark server must be written back as ``id`` values (``TRAINID_TO_ID``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255
"""Train id of every pixel that is not evaluated (void classes, unlabeled, ego vehicle, ...)."""

NUM_CLASSES = 19
"""Number of evaluated Cityscapes classes (train ids 0..18)."""


class CityscapesLabel(NamedTuple):
    """One row of the official label table.

    Attributes:
        name: class name, unique.
        id: value stored in ``*_gtFine_labelIds.png`` (-1: no id, never in ground truth).
        train_id: 0..18 for the evaluated classes, 255 (or -1 for license plate) otherwise.
        category: coarse category name (flat, construction, object, ...).
        category_id: coarse category id.
        has_instances: whether the class has instance annotations.
        ignore_in_eval: whether the class is ignored by the 19-class evaluation.
        color: RGB colour used for visualisation.
    """

    name: str
    id: int
    train_id: int
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# fmt: off
LABELS: tuple[CityscapesLabel, ...] = (
    #               name                    id  trainId  category       catId  inst   ignore  color
    CityscapesLabel("unlabeled",             0, 255, "void",           0, False, True,  (0, 0, 0)),
    CityscapesLabel("ego vehicle",           1, 255, "void",           0, False, True,  (0, 0, 0)),
    CityscapesLabel("rectification border",  2, 255, "void",           0, False, True,  (0, 0, 0)),
    CityscapesLabel("out of roi",            3, 255, "void",           0, False, True,  (0, 0, 0)),
    CityscapesLabel("static",                4, 255, "void",           0, False, True,  (0, 0, 0)),
    CityscapesLabel("dynamic",               5, 255, "void",           0, False, True,  (111, 74, 0)),
    CityscapesLabel("ground",                6, 255, "void",           0, False, True,  (81, 0, 81)),
    CityscapesLabel("road",                  7,   0, "flat",           1, False, False, (128, 64, 128)),
    CityscapesLabel("sidewalk",              8,   1, "flat",           1, False, False, (244, 35, 232)),
    CityscapesLabel("parking",               9, 255, "flat",           1, False, True,  (250, 170, 160)),
    CityscapesLabel("rail track",           10, 255, "flat",           1, False, True,  (230, 150, 140)),
    CityscapesLabel("building",             11,   2, "construction",   2, False, False, (70, 70, 70)),
    CityscapesLabel("wall",                 12,   3, "construction",   2, False, False, (102, 102, 156)),
    CityscapesLabel("fence",                13,   4, "construction",   2, False, False, (190, 153, 153)),
    CityscapesLabel("guard rail",           14, 255, "construction",   2, False, True,  (180, 165, 180)),
    CityscapesLabel("bridge",               15, 255, "construction",   2, False, True,  (150, 100, 100)),
    CityscapesLabel("tunnel",               16, 255, "construction",   2, False, True,  (150, 120, 90)),
    CityscapesLabel("pole",                 17,   5, "object",         3, False, False, (153, 153, 153)),
    CityscapesLabel("polegroup",            18, 255, "object",         3, False, True,  (153, 153, 153)),
    CityscapesLabel("traffic light",        19,   6, "object",         3, False, False, (250, 170, 30)),
    CityscapesLabel("traffic sign",         20,   7, "object",         3, False, False, (220, 220, 0)),
    CityscapesLabel("vegetation",           21,   8, "nature",         4, False, False, (107, 142, 35)),
    CityscapesLabel("terrain",              22,   9, "nature",         4, False, False, (152, 251, 152)),
    CityscapesLabel("sky",                  23,  10, "sky",            5, False, False, (70, 130, 180)),
    CityscapesLabel("person",               24,  11, "human",          6, True,  False, (220, 20, 60)),
    CityscapesLabel("rider",                25,  12, "human",          6, True,  False, (255, 0, 0)),
    CityscapesLabel("car",                  26,  13, "vehicle",        7, True,  False, (0, 0, 142)),
    CityscapesLabel("truck",                27,  14, "vehicle",        7, True,  False, (0, 0, 70)),
    CityscapesLabel("bus",                  28,  15, "vehicle",        7, True,  False, (0, 60, 100)),
    CityscapesLabel("caravan",              29, 255, "vehicle",        7, True,  True,  (0, 0, 90)),
    CityscapesLabel("trailer",              30, 255, "vehicle",        7, True,  True,  (0, 0, 110)),
    CityscapesLabel("train",                31,  16, "vehicle",        7, True,  False, (0, 80, 100)),
    CityscapesLabel("motorcycle",           32,  17, "vehicle",        7, True,  False, (0, 0, 230)),
    CityscapesLabel("bicycle",              33,  18, "vehicle",        7, True,  False, (119, 11, 32)),
    CityscapesLabel("license plate",        -1,  -1, "vehicle",        7, False, True,  (0, 0, 142)),
)
# fmt: on

NAME_TO_LABEL: dict[str, CityscapesLabel] = {label.name: label for label in LABELS}
"""Label row by class name, e.g. ``NAME_TO_LABEL["car"].id == 26``."""

ID_TO_LABEL: dict[int, CityscapesLabel] = {label.id: label for label in LABELS}
"""Label row by label id (includes -1, license plate)."""

VALID_LABEL_IDS: frozenset[int] = frozenset(label.id for label in LABELS if label.id >= 0)
"""Every value a ``*_gtFine_labelIds.png`` may contain (0..33)."""

_TRAIN_LABELS = sorted(
    (label for label in LABELS if 0 <= label.train_id < IGNORE_INDEX), key=lambda lb: lb.train_id
)

CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in _TRAIN_LABELS)
"""Names of the 19 evaluated classes, indexed by train id."""

PALETTE: np.ndarray = np.array([label.color for label in _TRAIN_LABELS], dtype=np.uint8)
"""Official RGB colour of each train id, shape ``(19, 3)`` uint8."""

TRAINID_TO_ID: np.ndarray = np.array([label.id for label in _TRAIN_LABELS], dtype=np.uint8)
"""Label id of each train id, shape ``(19,)`` uint8: turns predictions into benchmark-server PNGs."""

ID_TO_TRAINID: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
"""Lookup table ``ID_TO_TRAINID[label_id] -> train id`` (size 256, uint8). Every value that is not
the id of one of the 19 evaluated classes maps to 255. Use as ``ID_TO_TRAINID[label_png]``."""
for _label in _TRAIN_LABELS:
    ID_TO_TRAINID[_label.id] = _label.train_id
del _label

_COLOR_LUT = np.zeros((256, 3), dtype=np.uint8)
_COLOR_LUT[:NUM_CLASSES] = PALETTE


def colorize(train_id_mask: np.ndarray) -> np.ndarray:
    """Colour a train-id mask with the official Cityscapes palette.

    Args:
        train_id_mask: ``(H, W)`` integer array of train ids (0..18); 255 and any other value
            outside 0..18 becomes black.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.

    Raises:
        ValueError: the mask is not two-dimensional.
    """
    mask = np.asarray(train_id_mask)
    if mask.ndim != 2:
        raise ValueError(f"colorize expects an (H, W) train-id mask, got shape {mask.shape}")
    index = np.where((mask >= 0) & (mask < NUM_CLASSES), mask, IGNORE_INDEX).astype(np.intp)
    return _COLOR_LUT[index]


def train_ids_to_label_ids(train_id_mask: np.ndarray) -> np.ndarray:
    """Turn a train-id prediction into Cityscapes label ids, as the benchmark server expects.

    Args:
        train_id_mask: ``(H, W)`` integer array of train ids 0..18 (255 becomes 0, unlabeled).

    Returns:
        ``(H, W)`` uint8 array of label ids.
    """
    mask = np.asarray(train_id_mask)
    lut = np.zeros(256, dtype=np.uint8)
    lut[:NUM_CLASSES] = TRAINID_TO_ID
    index = np.where((mask >= 0) & (mask < NUM_CLASSES), mask, IGNORE_INDEX).astype(np.intp)
    return lut[index]
