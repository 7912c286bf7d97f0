"""The benchmark's statistics: timing loop, per-image summary, pooled rounds, peak memory."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "busy_warnings",
    "load_report",
    "machine_load",
    "merge_rounds",
    "peak_rss_mb",
    "summarise",
    "time_calls",
]


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


def _cpu_times() -> list[int] | None:
    """The aggregate ``cpu`` line of ``/proc/stat`` (user, nice, system, idle, ..., steal)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None


def machine_load(threads: int, seconds: float = 1.0, calibration_runs: int = 15) -> dict:
    """How busy this machine is: load average, CPU use and steal, and a calibration loop.

    The calibration loop times a fixed amount of work (a 384x384 float32 matmul chain on
    ``threads`` threads) ``calibration_runs`` times: on an idle machine its spread
    (p90 / p10) stays near 1.0; other processes on the same cores stretch it.

    Returns:
        ``{"loadavg": 1-minute load, "cpus": online CPUs, "busy": fraction of CPU time used
        (all processes, over ``seconds``), "steal": fraction stolen by the hypervisor,
        "calib_ms": median calibration time, "calib_spread": p90 / p10}``.
    """
    cpus = os.cpu_count() or 1
    first = _cpu_times()
    time.sleep(seconds)
    second = _cpu_times()
    busy = steal = float("nan")
    if first and second:
        delta = [b - a for a, b in zip(first, second, strict=False)]
        total = sum(delta) or 1
        idle = delta[3] + (delta[4] if len(delta) > 4 else 0)
        busy, steal = 1 - idle / total, (delta[7] / total if len(delta) > 7 else 0.0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.rand(384, 384, generator=torch.Generator().manual_seed(0))

    def work() -> None:
        x = a
        for _ in range(20):
            x = torch.tanh(x @ a)

    t = np.asarray(time_calls(work, calibration_runs, 3)) * 1000
    torch.set_num_threads(old_threads)
    return {
        "loadavg": os.getloadavg()[0],
        "cpus": cpus,
        "busy": busy,
        "steal": steal,
        "calib_ms": float(np.median(t)),
        "calib_spread": float(np.percentile(t, 90) / np.percentile(t, 10)),
    }


def busy_warnings(before: dict, after: dict | None = None) -> list[str]:
    """Warnings when :func:`machine_load` says the timings are not trustworthy.

    Busy when, before or after the run: other processes used more than a quarter of the CPU
    time while the benchmark was idle, the hypervisor stole more than 5 %, the calibration
    loop's spread exceeds 1.25, or its median moved by more than 20 % between before and after.
    """
    out = []
    for when, m in (("before", before), ("after", after)):
        if not m:
            continue
        if m["busy"] > 0.25:
            out.append(
                f"{when}: other processes used {100 * m['busy']:.0f} % of the {m['cpus']} CPUs "
                f"(load average {m['loadavg']:.1f})"
            )
        if m["steal"] > 0.05:
            out.append(f"{when}: hypervisor steal {100 * m['steal']:.0f} %")
        if m["calib_spread"] > 1.25:
            out.append(
                f"{when}: calibration loop spread p90/p10 = {m['calib_spread']:.2f} "
                f"(idle: ~1.0; median {m['calib_ms']:.1f} ms)"
            )
    if before and after:
        drift = after["calib_ms"] / before["calib_ms"]
        if not 0.8 <= drift <= 1.25:
            out.append(
                f"calibration loop {before['calib_ms']:.1f} ms before, {after['calib_ms']:.1f} ms "
                "after: the machine's speed changed during the run"
            )
    return out


def load_report(before: dict | None, after: dict | None) -> list[str]:
    """The lines a benchmark tool prints under its table: one ``WARNING (busy machine)`` line
    per :func:`busy_warnings` entry, then the load averages before and after (nothing when the
    load was not measured)."""
    if not before:
        return []
    lines = [f"WARNING (busy machine): {w}" for w in busy_warnings(before, after)]
    if after:
        lines.append(
            f"load average {before['loadavg']:.1f} before, {after['loadavg']:.1f} after "
            f"({os.cpu_count()} CPUs)"
        )
    return lines
