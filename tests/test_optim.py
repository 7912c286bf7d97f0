"""Optimiser helpers: no weight decay on norm/bias, warm-up + cosine / poly schedules, EMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mnv3det.tasks.optim import (
    make_ema,
    param_groups,
    set_bn_momentum,
    sgd_with_schedule,
    warmup_cosine,
    warmup_poly,
)


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def test_param_groups_decay_only_conv_weights() -> None:
    model = _model()
    model[2].weight.requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = param_groups(model, weight_decay=4e-5)
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    expected = {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert {id(p) for p in no_decay["params"]} == expected


def test_warmup_cosine_shape() -> None:
    assert warmup_cosine(0, 100, 10) == pytest.approx(1e-3)
    assert warmup_cosine(5, 100, 10) == pytest.approx(1e-3 * 0.5 + 0.5)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_warmup_poly_shape() -> None:
    assert warmup_poly(0, 100) == 1.0
    assert warmup_poly(50, 100) == pytest.approx(0.5**0.9)
    assert warmup_poly(100, 100) == 0.0


def test_sgd_with_schedule_steps_the_lr_per_step() -> None:
    model = _model()
    config = sgd_with_schedule(model, 0.1, 0.9, 1e-4, total_steps=10, warmup_steps=2)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[2] == pytest.approx(0.1)
    assert lrs[2:] == sorted(lrs[2:], reverse=True)
    with pytest.raises(ValueError, match="schedule must be"):
        sgd_with_schedule(model, 0.1, 0.9, 0.0, 10, 0, schedule="step")


def test_set_bn_momentum_and_bad_value() -> None:
    model = _model()
    set_bn_momentum(model, 0.03, "Task")
    assert model[1].momentum == 0.03
    with pytest.raises(ValueError, match=r"Task: bn_momentum must be in \(0, 1\]"):
        set_bn_momentum(model, 1.5, "Task")


def test_ema_follows_weights() -> None:
    model = _model()
    ema = make_ema(model, decay=0.5)
    ema.update_parameters(model)  # the first update copies the weights
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight, before + 0.5)  # half-way with decay 0.5
