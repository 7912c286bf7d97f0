"""DataLoader settings follow the machine: workers per available core, pinning only with CUDA."""

from __future__ import annotations

import pytest
import torch

from mnv3det.data.loader_defaults import (
    MAX_AUTO_WORKERS,
    available_cpus,
    resolve_num_workers,
    resolve_pin_memory,
)


def test_automatic_workers_match_the_cores_this_process_may_use() -> None:
    assert resolve_num_workers(None) == min(MAX_AUTO_WORKERS, available_cpus())
    assert resolve_num_workers(0) == 0 and resolve_num_workers(3) == 3
    with pytest.raises(ValueError, match="num_workers"):
        resolve_num_workers(-1)


def test_pin_memory_only_with_cuda() -> None:
    assert resolve_pin_memory(None) is torch.cuda.is_available()
    assert resolve_pin_memory(True) is True and resolve_pin_memory(False) is False
