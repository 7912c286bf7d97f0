"""The SSD augmentation: the hand-written ZoomOut and MinIoURandomCrop (boxes and labels move
together, the IoU constraint holds, boxes stay inside, seeded determinism) and the pipelines."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mnv3det.data.detection_transforms import (
    IMAGENET_MEAN_RGB,
    MinIoURandomCrop,
    ZoomOut,
    bbox_params,
    eval_transforms,
    train_transforms,
)
from mnv3det.data.seeding import seed_worker_transforms

# Each label paints its box in its own colour, so after a transform the colour at a box's
# centre says which label the box must carry.
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}


def painted(height=120, width=160):
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    boxes = np.array(
        [[10, 10, 50, 40], [70, 20, 150, 70], [20, 60, 60, 110], [100, 80, 130, 115]],
        dtype=np.float32,
    )
    labels = np.array([1, 2, 3, 4])
    for (x0, y0, x1, y1), label in zip(boxes.astype(int), labels):
        image[y0:y1, x0:x1] = COLOURS[label]
    return image, boxes, labels


def coordinate_image(height=200, width=250):
    """Pixel (y, x) holds (x, y, 0): a crop's offset can be read off its top-left pixel."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)


def assert_boxes_carry_their_labels(out):
    image = out["image"]
    for box, label in zip(np.asarray(out["bboxes"]), out["labels"]):
        cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        assert tuple(image[cy, cx]) == COLOURS[int(label)], (box, label)


def assert_inside(out):
    boxes = np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4)
    height, width = out["image"].shape[:2]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all()
    assert (boxes[:, 3] <= height).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()


# ---------------------------------------------------------------- ZoomOut
@pytest.mark.parametrize("seed", range(8))
def test_zoom_out_moves_boxes_and_labels_with_the_image(seed):
    image, boxes, labels = painted()
    pipe = A.Compose([ZoomOut(max_scale=3.0, p=1.0)], bbox_params=bbox_params(), seed=seed)
    out = pipe(image=image, bboxes=boxes, labels=labels)
    height, width = out["image"].shape[:2]
    ratio_h, ratio_w = height / 120, width / 160
    assert 1.0 <= ratio_h <= 3.0 + 1e-2 and abs(ratio_h - ratio_w) < 0.02  # aspect ratio kept
    assert list(out["labels"]) == [1, 2, 3, 4]  # nothing lost: the canvas only grows
    out_boxes = np.asarray(out["bboxes"])
    shift = out_boxes[0, :2] - boxes[0, :2]
    np.testing.assert_allclose(out_boxes - np.tile(shift, 2), boxes, atol=1e-3)  # pure shift
    left, top = (int(np.rint(v)) for v in shift)
    np.testing.assert_array_equal(out["image"][top : top + 120, left : left + 160], image)
    assert_boxes_carry_their_labels(out)
    assert_inside(out)
    if height > 121:  # the canvas is the mean colour
        corner = out["image"][0 if top > 0 else -1, 0 if left > 0 else -1]
        assert tuple(corner) == IMAGENET_MEAN_RGB


def test_zoom_out_with_mask_and_no_boxes():
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    mask = np.ones((30, 40), dtype=np.uint8)
    pipe = A.Compose([ZoomOut(max_scale=2.0, p=1.0)], bbox_params=bbox_params(), seed=0)
    out = pipe(image=image, mask=mask, bboxes=np.zeros((0, 4)), labels=np.zeros(0))
    assert out["mask"].shape == out["image"].shape[:2]
    assert out["mask"].sum() == 30 * 40  # the mask is padded with 0, not stretched
    assert len(out["bboxes"]) == 0


def test_zoom_out_rejects_bad_scale():
    with pytest.raises(ValueError):
        ZoomOut(max_scale=0.5)


# ---------------------------------------------------------------- MinIoURandomCrop
def _boxes(rng, n, height=200, width=250):
    x0 = rng.uniform(0, width - 20, n)
    y0 = rng.uniform(0, height - 30, n)
    w = rng.uniform(10, 220, n)
    h = rng.uniform(10, 180, n)
    return np.stack([x0, y0, np.minimum(x0 + w, width), np.minimum(y0 + h, height)], 1).astype(
        np.float32
    )


def _iou(boxes, crop):
    left, top, right, bottom = crop
    iw = np.clip(np.minimum(boxes[:, 2], right) - np.maximum(boxes[:, 0], left), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], bottom) - np.maximum(boxes[:, 1], top), 0, None)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + (right - left) * (bottom - top) - inter)


@pytest.mark.parametrize("min_iou", [0.1, 0.5, 0.7])
def test_min_iou_crop_keeps_the_constraint_and_drops_boxes_by_centre(min_iou):
    image = coordinate_image()
    cropped_any = 0
    for seed in range(25):
        rng = np.random.default_rng(seed)
        boxes = _boxes(rng, 5)
        labels = np.arange(10, 15)
        pipe = A.Compose(
            [MinIoURandomCrop(min_ious=(min_iou,))], bbox_params=bbox_params(min_size=0), seed=seed
        )
        out = pipe(image=image, bboxes=boxes, labels=labels)
        left, top = (int(v) for v in out["image"][0, 0, :2])
        height, width = out["image"].shape[:2]
        crop = (left, top, left + width, top + height)
        if crop == (0, 0, 250, 200):
            continue  # no crop satisfied the constraint within the trials: whole image
        cropped_any += 1
        assert width >= 0.3 * 250 - 1 and height >= 0.3 * 200 - 1  # min_scale
        assert 0.5 <= width / height <= 2.0
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (left < cx) & (cx < crop[2]) & (top < cy) & (cy < crop[3])
        # exactly the boxes whose centre is in the crop survive, each with its own label
        assert list(out["labels"]) == list(labels[inside])
        # the constraint: the best IoU of a kept box with the crop is >= min_iou
        assert _iou(boxes[inside], crop).max() >= min_iou - 1e-6
        expected = boxes[inside] - np.array([left, top, left, top], dtype=np.float32)
        expected = np.clip(expected, 0, [width, height, width, height])
        np.testing.assert_allclose(np.asarray(out["bboxes"]), expected, atol=1e-3)
        assert_inside(out)
    assert cropped_any >= 5


@pytest.mark.parametrize("seed", range(6))
def test_min_iou_crop_labels_follow_boxes(seed):
    image, boxes, labels = painted()
    pipe = A.Compose([MinIoURandomCrop()], bbox_params=bbox_params(), seed=seed)
    out = pipe(image=image, bboxes=boxes, labels=labels)
    assert_boxes_carry_their_labels(out)
    assert_inside(out)


def test_min_iou_crop_one_means_whole_image_and_empty_images_are_left_whole():
    image, boxes, labels = painted()
    whole = A.Compose([MinIoURandomCrop(min_ious=(1.0,))], bbox_params=bbox_params(), seed=0)
    out = whole(image=image, bboxes=boxes, labels=labels)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_allclose(out["bboxes"], boxes, atol=1e-3)
    empty = A.Compose([MinIoURandomCrop()], bbox_params=bbox_params(), seed=0)
    out = empty(image=image, bboxes=np.zeros((0, 4)), labels=np.zeros(0))
    assert out["image"].shape == image.shape


def test_min_iou_crop_rejects_bad_arguments():
    with pytest.raises(ValueError):
        MinIoURandomCrop(min_scale=0.9, max_scale=0.5)
    with pytest.raises(ValueError):
        MinIoURandomCrop(min_ious=())
    with pytest.raises(ValueError):
        MinIoURandomCrop(trials=0)


# ---------------------------------------------------------------- pipelines
@pytest.mark.parametrize("seed", range(10))
def test_train_pipeline_output_size_boxes_inside_labels_aligned(seed):
    image, boxes, labels = painted()
    pipe = train_transforms(96, photometric=False, seed=seed)  # colours intact for the check
    out = pipe(image=image, bboxes=boxes, labels=labels)
    assert out["image"].shape == (96, 96, 3) and out["image"].dtype == np.uint8
    assert len(out["bboxes"]) == len(out["labels"])
    assert_inside(out)
    # Resizing blends edges: check the label colour a few pixels inside larger boxes only.
    for box, label in zip(np.asarray(out["bboxes"]), out["labels"]):
        if min(box[2] - box[0], box[3] - box[1]) >= 6:
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            np.testing.assert_allclose(out["image"][cy, cx], COLOURS[int(label)], atol=40)


def test_train_pipeline_is_deterministic_in_seed_and_photometric_changes_colours():
    image, boxes, labels = painted()
    runs = []
    for seed in (0, 0, 1):
        pipe = train_transforms(64, seed=seed)
        runs.append([pipe(image=image, bboxes=boxes, labels=labels) for _ in range(4)])
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["bboxes"], b["bboxes"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert any(not np.array_equal(a["image"], c["image"]) for a, c in zip(runs[0], runs[2]))
    jitter = A.Compose(train_transforms(64, seed=0).transforms[:1], seed=0)
    changed = [not np.array_equal(jitter(image=image)["image"], image) for _ in range(10)]
    assert any(changed)


def test_train_pipeline_options():
    names = [type(t).__name__ for t in train_transforms(64, channel_shuffle_p=0.5).transforms]
    assert names == [
        "ColorJitter",
        "ChannelShuffle",
        "ZoomOut",
        "MinIoURandomCrop",
        "HorizontalFlip",
        "Resize",
    ]
    bare = train_transforms((48, 64), photometric=False, zoom_out=False, iou_crop=False, hflip_p=0)
    assert [type(t).__name__ for t in bare.transforms] == ["Resize"]
    image, boxes, labels = painted()
    out = bare(image=image, bboxes=boxes, labels=labels)
    assert out["image"].shape == (48, 64, 3)
    np.testing.assert_allclose(out["bboxes"], boxes * np.array([0.4, 0.4, 0.4, 0.4]), atol=1e-3)


def test_small_boxes_are_judged_at_the_output_size():
    """``min_box_size`` is in output pixels: the filter runs after the resize, not before."""
    image = np.full((100, 100, 3), 128, dtype=np.uint8)
    boxes = np.array([[10, 10, 10.8, 30], [50, 50, 80, 80]], dtype=np.float32)  # 0.8 px wide
    labels = np.array([1, 2])
    bare = dict(photometric=False, zoom_out=False, iou_crop=False, hflip_p=0, min_box_size=1.0)
    up = train_transforms(320, **bare)(image=image, bboxes=boxes, labels=labels)
    assert list(up["labels"]) == [1, 2]  # 2.56 px wide after the 3.2x resize: kept
    np.testing.assert_allclose(up["bboxes"][0], [32, 32, 34.56, 96], atol=1e-3)
    down = train_transforms(50, **bare)(image=image, bboxes=boxes, labels=labels)
    assert list(down["labels"]) == [2]  # 0.4 px wide after the 0.5x resize: dropped
    # the same after a min-IoU crop that keeps the whole image, with the pipeline's flip
    crop = dict(photometric=False, zoom_out=False, min_ious=(1.0,), hflip_p=1.0)
    flipped = train_transforms(320, **crop)(image=image, bboxes=boxes, labels=labels)
    assert list(flipped["labels"]) == [1, 2]
    np.testing.assert_allclose(flipped["bboxes"][0], [320 - 34.56, 32, 320 - 32, 96], atol=1e-3)


def test_eval_pipeline_is_identity():
    image, boxes, labels = painted()
    out = eval_transforms()(image=image, bboxes=boxes, labels=labels)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_allclose(out["bboxes"], boxes, atol=1e-3)
    assert list(out["labels"]) == [1, 2, 3, 4]


class _Augmented(Dataset):
    def __init__(self):
        self.transforms = A.Compose([A.HorizontalFlip(p=0.5)], seed=0)
        self.image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)

    def __len__(self):
        return 16

    def __getitem__(self, index):
        flipped = not np.array_equal(self.transforms(image=self.image)["image"], self.image)
        return torch.tensor(int(flipped))


def test_seed_worker_transforms_gives_each_worker_its_own_stream():
    torch.manual_seed(0)
    loader = DataLoader(
        _Augmented(), batch_size=8, num_workers=2, worker_init_fn=seed_worker_transforms
    )
    first, second = (batch.tolist() for batch in loader)  # batch 0 from worker 0, 1 from 1
    assert first != second  # without reseeding both workers replay the same coin flips
    seed_worker_transforms(0)  # outside a worker: does nothing


@pytest.mark.parametrize(
    "make", [lambda: ZoomOut(max_scale=3.0, p=1.0), lambda: MinIoURandomCrop(min_ious=(0.3,))]
)
def test_hand_written_transforms_are_deterministic_in_seed(make):
    image, boxes, labels = painted()

    def run(seed):
        pipe = A.Compose([make()], bbox_params=bbox_params(), seed=seed)
        return [pipe(image=image, bboxes=boxes, labels=labels) for _ in range(5)]

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["bboxes"], b["bboxes"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert any(a["image"].shape != c["image"].shape for a, c in zip(first, other))
