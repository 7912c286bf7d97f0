"""The Cityscapes label table against known values of cityscapesScripts' labels.py."""

from __future__ import annotations

import numpy as np
import pytest

from mnv3det.data.cityscapes_labels import (
    CLASS_NAMES,
    ID_TO_TRAINID,
    LABELS,
    NAME_TO_LABEL,
    PALETTE,
    TRAINID_TO_ID,
    VALID_LABEL_IDS,
    colorize,
    train_ids_to_label_ids,
)


def test_table_shape_and_ids() -> None:
    assert len(LABELS) == 35  # ids 0..33 plus license plate (-1)
    assert sorted(lb.id for lb in LABELS) == [-1, *range(34)]
    assert frozenset(range(34)) == VALID_LABEL_IDS
    assert NAME_TO_LABEL["license plate"].id == -1


@pytest.mark.parametrize(
    ("label_id", "train_id"),
    [
        (0, 255),
        (1, 255),
        (3, 255),
        (4, 255),
        (6, 255),
        (7, 0),
        (8, 1),
        (9, 255),
        (11, 2),
        (14, 255),
        (17, 5),
        (18, 255),
        (21, 8),
        (23, 10),
        (24, 11),
        (26, 13),
        (29, 255),
        (30, 255),
        (31, 16),
        (33, 18),
        (34, 255),
        (200, 255),
        (255, 255),
    ],
)
def test_id_to_trainid_known_values(label_id: int, train_id: int) -> None:
    assert ID_TO_TRAINID.dtype == np.uint8 and ID_TO_TRAINID.shape == (256,)
    assert ID_TO_TRAINID[label_id] == train_id


def test_trainid_round_trip_names_and_palette() -> None:
    assert len(CLASS_NAMES) == 19 and CLASS_NAMES[0] == "road" and CLASS_NAMES[13] == "car"
    assert CLASS_NAMES[-1] == "bicycle"
    assert TRAINID_TO_ID.tolist() == [
        7,
        8,
        11,
        12,
        13,
        17,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        31,
        32,
        33,
    ]
    np.testing.assert_array_equal(ID_TO_TRAINID[TRAINID_TO_ID], np.arange(19))
    assert (ID_TO_TRAINID != 255).sum() == 19
    assert PALETTE.shape == (19, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[0].tolist() == [128, 64, 128]  # road
    assert PALETTE[10].tolist() == [70, 130, 180]  # sky
    assert PALETTE[13].tolist() == [0, 0, 142]  # car


def test_colorize_and_back_to_label_ids() -> None:
    mask = np.array([[0, 13, 255], [18, 10, 7]], dtype=np.int64)
    rgb = colorize(mask)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [128, 64, 128]
    assert rgb[0, 1].tolist() == [0, 0, 142]
    assert rgb[0, 2].tolist() == [0, 0, 0]  # ignore -> black
    assert rgb[1, 0].tolist() == [119, 11, 32]
    ids = train_ids_to_label_ids(mask)
    assert ids.tolist() == [[7, 26, 0], [33, 23, 20]]
    with pytest.raises(ValueError, match="colorize expects"):
        colorize(np.zeros((2, 2, 3), dtype=np.uint8))
