"""A full disk while ``mnv3det fit`` saves ``last.ckpt``: one line naming the folder, exit 2, and
the previous ``last.ckpt`` still loads.

Two ways to fill the disk: a real 4 MB tmpfs under the run's log folder (needs ``mount``, i.e.
root; skipped elsewhere), and a ``-c`` wrapper around the command whose ``os.fsync`` fails with
ENOSPC for every ``last.ckpt`` write after the first (runs everywhere).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from stop_runs import STEPS_PER_EPOCH, fit_args, load, logs_of, make_coco, run_fit

FULL_AFTER_FIRST = textwrap.dedent(
    """
    import errno, os, sys
    real_fsync, writes = os.fsync, []

    def fsync(fd):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if ".tmp-last.ckpt" in name:  # AtomicCheckpointIO's temporary file of last.ckpt
            writes.append(name)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    os.fsync = fsync
    from mnv3det.cli import main
    sys.exit(main())
    """
)


def mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tmpfs", "failing_fsync"])
def test_full_disk_while_saving_last_ckpt(tmp_path, how: str) -> None:
    args = fit_args(make_coco(tmp_path / "coco"))
    logs = tmp_path / "logs"
    prefix = None
    if how == "tmpfs":
        # one last.ckpt of this model (2.6 MB) fits, a second beside it (written atomically:
        # the new file is complete before the old one goes) does not
        if sys.platform != "linux" or not mount_tmpfs(logs, "4m"):
            pytest.skip("no tmpfs: mount needs root")
    else:
        prefix = [sys.executable, "-c", FULL_AFTER_FIRST]
    try:
        code, out = run_fit(args, tmp_path, prefix=prefix)
        folder = logs_of(tmp_path) / "version_0" / "checkpoints"
        errors = [line for line in out.splitlines() if line.startswith("mnv3det fit: error:")]
        print("\n".join(errors))
        assert code == 2, out[-3000:]
        assert len(errors) == 1 and "Traceback" not in out
        assert "cannot write checkpoint" in errors[0] and "the disk is full" in errors[0]
        assert str(folder.relative_to(tmp_path)) in errors[0]
        # the previous last.ckpt (end of the first epoch) is intact; no temporary file is left
        assert load(folder / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
        assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(logs)], capture_output=True, timeout=30)
