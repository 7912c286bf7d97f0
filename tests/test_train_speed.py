"""Training speed options of the tasks (mnv3det.tasks.speed): depthwise convolutions in fp32
under CPU autocast, the autocast choice, channels_last weights, fused SGD, and tiny fits with
every precision a config can ask for (``32-true``, ``bf16-mixed``, ``16-mixed``) and with
``compile: true``, on the CPU."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco
from mnv3det.tasks.detection import DetectionTask
from mnv3det.tasks.detection_data import CocoDataModule
from mnv3det.tasks.optim import can_fuse_sgd, sgd_with_schedule
from mnv3det.tasks.segmentation import SegmentationTask
from mnv3det.tasks.segmentation_data import CityscapesDataModule
from mnv3det.tasks.speed import (
    Float32DepthwiseConv2d,
    cpu_has_native_bf16,
    keep_depthwise_in_float32,
    resolve_train_autocast,
    train_autocast,
)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny tensors gain nothing from two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _block() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)
    )


def test_depthwise_convs_run_in_fp32_under_cpu_autocast_only() -> None:
    model = _block()
    keys = list(model.state_dict())
    x = torch.rand(2, 3, 8, 8)
    reference = model(x)
    assert keep_depthwise_in_float32(model) == 1
    assert type(model[1]) is Float32DepthwiseConv2d and type(model[0]) is nn.Conv2d
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), reference)  # plain nn.Conv2d outside autocast
    dtypes = {}
    for i, layer in enumerate(model):
        layer.register_forward_hook(lambda m, a, out, i=i: dtypes.__setitem__(i, out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert dtypes == {0: torch.bfloat16, 1: torch.float32, 2: torch.bfloat16}
    assert torch.allclose(out.float(), reference, atol=0.05, rtol=0.05)


def test_autocast_choice() -> None:
    assert resolve_train_autocast("off", "cpu") is None
    assert resolve_train_autocast("bf16", "cpu") is torch.bfloat16
    assert resolve_train_autocast("bf16", "cuda") is torch.bfloat16
    assert resolve_train_autocast("auto", "cuda") is None  # trainer.precision decides on GPUs
    native = torch.bfloat16 if cpu_has_native_bf16() else None
    assert resolve_train_autocast("auto", "cpu") is native
    with pytest.raises(ValueError, match="train_autocast must be one of"):
        resolve_train_autocast("fp16", "cpu")
    with train_autocast(torch.bfloat16, "cpu"):
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16), train_autocast(torch.bfloat16, "cpu"):
        assert torch.get_autocast_dtype("cpu") is torch.float16  # the trainer's choice wins
    with train_autocast(None, "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_sgd_is_fused_where_pytorch_has_the_kernel() -> None:
    model = _block()
    assert can_fuse_sgd(model.parameters())
    assert sgd_with_schedule(model, 0.1, 0.9, 0.0, 10, 0)["optimizer"].defaults["fused"]
    unfused = sgd_with_schedule(model, 0.1, 0.9, 0.0, 10, 0, fused=False)["optimizer"]
    assert not unfused.defaults["fused"]
    assert not can_fuse_sgd([])


def test_tasks_fit_in_channels_last_by_default_and_end_in_nchw() -> None:
    fast = DetectionTask("small", num_classes=3, size=64, width_mult=0.5, ema_decay=0.9)
    plain = DetectionTask("small", num_classes=3, size=64, width_mult=0.5, channels_last=False)
    weight = fast.model.backbone.features[0][0].weight
    ema_weight = fast.ema.module.backbone.features[0][0].weight
    seg = SegmentationTask("small", num_classes=3, width_mult=0.5)
    for task in (fast, plain, seg):  # Lightning calls configure_model in fit before DDP wraps it
        task.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        task.trainer.state.fn = TrainerFn.FITTING
        task.configure_model()
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert ema_weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.model.backbone.features[0][0].weight is weight  # an optimiser keeps its tensors
    assert plain.model.backbone.features[0][0].weight.is_contiguous()
    assert list(fast.model.state_dict()) == list(plain.model.state_dict())
    fast.on_fit_end()
    assert weight.is_contiguous() and ema_weight.is_contiguous()
    assert seg.model.backbone.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    seg.on_fit_end()
    assert seg.model.backbone.features[0][0].weight.is_contiguous()
    assert any(isinstance(m, Float32DepthwiseConv2d) for m in fast.model.backbone.modules())
    head_convs = [m for m in fast.model.head.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is Float32DepthwiseConv2d for m in head_convs)  # fp32 outputs
    with pytest.raises(ValueError, match="train_autocast must be one of"):
        DetectionTask("small", num_classes=3, size=64, train_autocast="fp16")
    with pytest.raises(ValueError, match="train_autocast must be one of"):
        SegmentationTask("small", num_classes=3, train_autocast="yes")


@pytest.mark.parametrize("mode", ["bf16", "off"])
def test_training_step_losses_are_fp32_and_close_to_fp32(mode, one_thread) -> None:
    torch.manual_seed(0)
    task = DetectionTask("small", num_classes=3, size=64, width_mult=0.5, train_autocast=mode)
    task.log = lambda *a, **k: None
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    loss = task.training_step((images, targets), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.no_grad():
        reference = task.model(images, targets)
    assert float(loss) == pytest.approx(float(sum(reference.values())), rel=0.05)
    seg = SegmentationTask("small", num_classes=3, width_mult=0.5, train_autocast=mode)
    seg.log = lambda *a, **k: None
    masks = torch.randint(0, 3, (2, 64, 64))
    loss = seg.training_step((torch.rand(2, 3, 64, 64), masks), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def _fit(task: L.LightningModule, data: L.LightningDataModule, precision: str, tmp_path) -> None:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=2, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, data)
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return generate_shapes_coco(
        tmp_path_factory.mktemp("speed") / "coco", num_train=4, num_val=2, image_size=64, seed=0
    )


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    return generate_street_scenes(
        tmp_path_factory.mktemp("speed") / "cityscapes",
        cities=("aachen",),
        per_city=2,
        size=(64, 128),
    )


# "16-mixed" on a CPU: Lightning warns that fp16 AMP is not supported there and trains with
# "bf16-mixed" (on a GPU it is fp16 with a GradScaler); the config still runs.
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_tiny_fits_with_every_precision(precision, coco_root, scenes_root, tmp_path, one_thread):
    det = DetectionTask("small", num_classes=5, size=64, width_mult=0.5, print_table=False)
    coco = CocoDataModule(coco_root, size=64, batch_size=2, num_workers=0, pin_memory=False)
    _fit(det, coco, precision, tmp_path)
    assert "val" in det.last_results
    seg = SegmentationTask("small", num_classes=19, width_mult=0.5, print_table=False)
    city = CityscapesDataModule(
        scenes_root, crop_size=(64, 64), batch_size=2, num_workers=0, pin_memory=False
    )
    _fit(seg, city, precision, tmp_path)


def test_compile_option_compiles_the_network_in_place_once() -> None:
    det = DetectionTask("small", num_classes=3, size=64, width_mult=0.5, compile=True)
    keys = list(det.state_dict())
    det.configure_model()
    det.configure_model()  # Lightning calls it per stage: compiled once
    for module in (det.model.backbone, det.model.extra, det.model.head):
        assert module._compiled_call_impl is not None
    assert list(det.state_dict()) == keys  # checkpoints load into uncompiled models
    seg = SegmentationTask("small", num_classes=3, width_mult=0.5, compile=True)
    seg.configure_model()
    assert seg.model._compiled_call_impl is not None
    plain = SegmentationTask("small", num_classes=3, width_mult=0.5)
    plain.configure_model()
    assert plain.model._compiled_call_impl is None


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MNV3DET_TEST_COMPILE"),
    reason="compiling a training step takes ~1-3 min on 2 CPU cores; MNV3DET_TEST_COMPILE=1 runs it",
)
def test_compiled_training_step_runs_under_bf16_and_learns(one_thread) -> None:
    seg = SegmentationTask("small", num_classes=3, width_mult=0.5, compile=True)
    seg.log = lambda *a, **k: None
    seg.configure_model()
    optimizer = sgd_with_schedule(seg.model, 0.01, 0.9, 0.0, 10, 0)["optimizer"]
    x, masks = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    losses = []
    for i in range(3):
        loss = seg.training_step((x, masks), i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
