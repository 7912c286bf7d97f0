"""``reuse_freed_memory``: glibc serves large tensors from its heap (kept after ``free``) instead
of a fresh ``mmap`` per tensor (returned to the system on ``free``), the effect behind the LR-ASPP
rows of docs/deployment.md. Checked on the mechanism, which is deterministic: the mapping that
holds a 256 MB tensor's memory, read from ``/proc/self/maps`` in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from mnv3det.deploy.memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "on" else False
x = torch.ones(64, 1024, 1024)  # 256 MB
ptr = x.data_ptr()
for line in open("/proc/self/maps"):
    fields = line.split()
    low, high = (int(v, 16) for v in fields[0].split("-"))
    if low <= ptr < high:
        print(applied, fields[5] if len(fields) > 5 else "anonymous")
"""


def _mapping(mode: str) -> tuple[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], out[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_large_tensors_come_from_the_heap() -> None:
    assert _mapping("on") == ("True", "[heap]")  # reused after free, no new page faults
    assert _mapping("off") == ("False", "anonymous")  # default: its own mmap, unmapped on free
