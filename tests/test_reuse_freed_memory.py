"""``reuse_freed_memory``: glibc keeps freed tensor memory, so a second large allocation needs
no new page faults (the effect behind the LR-ASPP rows of docs/deployment.md)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from mnv3det.deploy.memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "on" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # warm-up: the first pass faults its pages in either way
    x = torch.ones(64, 1024, 1024)  # 256 MB
    del x
before = faults()
for _ in range(4):
    x = torch.ones(64, 1024, 1024)
    del x
print(applied, faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_second_allocation_reuses_pages() -> None:
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    applied, faults_on = run("on")
    _, faults_off = run("off")
    assert applied == "True"
    pages = 4 * 256 * 1024 * 1024 // resource.getpagesize()
    assert faults_off > pages // 2  # default: every 256 MB tensor is page-faulted in again
    # reused: at most one of the four allocations faults its pages in again (an aligned
    # request can miss the freed chunk by a few bytes, depending on the heap's layout)
    assert faults_on <= pages // 4 + 1000 and faults_on * 3 < faults_off
