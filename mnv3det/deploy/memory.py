"""Keep freed memory for reuse: a glibc malloc setting for large-tensor CPU inference.

A forward pass of LR-ASPP at 1024x2048 allocates and frees about a gigabyte of activations, in
tensors of 8-256 MB. glibc's ``malloc`` serves every block above its mmap threshold (32 MB at
most) with a fresh ``mmap`` and gives it back with ``munmap`` when the tensor is freed, so each
pass page-faults its activations in again and the kernel zeroes every page. PyTorch has no
caching allocator on the CPU, so this is paid on every call. On the benchmark machine (2 cores)
it took more than half of torchvision's LR-ASPP time at 1024x2048 (1050 ms per image by
default, 470 ms with the setting below) and a third of ours (fused + channels_last: 210-300 ms,
150 ms). onnxruntime and OpenVINO keep their own memory arenas and do not need it.

:func:`reuse_freed_memory` tells glibc to serve large blocks from its heap as well
(``M_MMAP_MAX = 0``) and not to return freed memory to the system (``M_TRIM_THRESHOLD``), so a
second pass mostly reuses the first one's pages. (Counted with ``getrusage``: of four 256 MB
allocations in a row, between none and three were still page-faulted in again, depending on the
machine; the benchmark gain above is what it did to whole forward passes.) The price: the
process keeps its peak memory. The
same for a whole program without code: the environment variables in
:data:`REUSE_FREED_MEMORY_ENV`, or preloading jemalloc / tcmalloc, as Intel's PyTorch CPU
tuning guide recommends. It is process-wide, so it is never switched on implicitly:
``mnv3det benchmark --reuse-freed-memory`` applies it to every row (torchvision's included)
and docs/deployment.md reports both settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["REUSE_FREED_MEMORY_ENV", "reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int

#: Environment variables with the same effect for a program started with them (glibc reads
#: them at start-up).
REUSE_FREED_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_NEVER_TRIM)}


def reuse_freed_memory() -> bool:
    """Make this process reuse freed tensor memory instead of page-faulting it in again.

    Call it once, before the first large allocation (e.g. at the start of an inference
    server). Only glibc (Linux) has the setting; elsewhere nothing happens.

    Returns:
        Whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # not glibc (e.g. musl)
        return False
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
