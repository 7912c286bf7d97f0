"""DataLoader settings that fit the machine the run is on.

``num_workers: null`` takes one worker per CPU core this process may use, at most 8 (torch
warns when a loader asks for more workers than cores, and more than 8 rarely helps one GPU);
``pin_memory: null`` pins host memory only when CUDA is available (pinning without a GPU only
costs time and makes torch warn).
"""

from __future__ import annotations

import os

import torch

__all__ = ["MAX_AUTO_WORKERS", "resolve_num_workers", "resolve_pin_memory"]

MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_num_workers(num_workers: int | None) -> int:
    """``num_workers`` as given, or one per available core (at most 8) for ``None``.

    Raises:
        ValueError: a negative number.
    """
    if num_workers is None:
        return min(MAX_AUTO_WORKERS, available_cpus())
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (or null for automatic), got {num_workers}")
    return int(num_workers)


def resolve_pin_memory(pin_memory: bool | None) -> bool:
    """``pin_memory`` as given, or whether CUDA is available for ``None``."""
    return torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
