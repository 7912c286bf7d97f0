"""Evaluation under DDP takes every image once: no padded repeats, and a clear error where a
process would get none."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from mnv3det.data import eval_sampling
from mnv3det.data.eval_sampling import EvalSetTooSmallError, UnpaddedDistributedSampler


@pytest.mark.parametrize("size", [1, 2, 5, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_image_once_over_all_ranks(size: int, world: int) -> None:
    data = list(range(size))
    shares = [list(UnpaddedDistributedSampler(data, world, rank)) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == data  # each once, none repeated
    assert [len(UnpaddedDistributedSampler(data, world, r)) for r in range(world)] == [
        len(s) for s in shares
    ]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_fewer_images_than_processes_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    with pytest.raises(EvalSetTooSmallError, match=r"val set has 1 image, .* --trainer.devices 1"):
        eval_sampling.eval_sampler([0], "val")
    sampler = eval_sampling.eval_sampler([0, 1, 2], "val")
    assert list(sampler) == [0, 2]


def test_no_sampler_in_one_process() -> None:
    assert eval_sampling.eval_sampler([0, 1]) is None
