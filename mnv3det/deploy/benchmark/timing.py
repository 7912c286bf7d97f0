"""The benchmark's statistics: timing loop, per-image summary, pooled rounds, peak memory."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["merge_rounds", "peak_rss_mb", "summarise", "time_calls"]


def time_calls(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summarise(per_image_ms: Sequence[float]) -> dict:
    """Median, interquartile range and images/s of per-image times (kept for pooling)."""
    t = np.asarray(per_image_ms, dtype=float)
    return {
        "median_ms": float(np.median(t)),
        "p25_ms": float(np.percentile(t, 25)),
        "p75_ms": float(np.percentile(t, 75)),
        "images_per_s": float(1000 / np.median(t)),
        "per_image_ms": t.tolist(),
    }


def merge_rounds(rows: Sequence[dict]) -> dict:
    """One row from the rounds of one (model, config, batch): timings pooled, stage times the
    median over rounds, peak memory the largest."""
    stages = {
        name: statistics.median(r["stages_ms"][name] for r in rows) for name in rows[0]["stages_ms"]
    }
    return {
        **rows[0],
        **summarise([t for r in rows for t in r["per_image_ms"]]),
        "stages_ms": stages,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "rounds": len(rows),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's ``VmHWM`` (``/proc/self/status``) belongs to the current address space, so it starts
    afresh in a subprocess; ``ru_maxrss`` survives ``exec`` and would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
