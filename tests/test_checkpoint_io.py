"""Checkpoint files survive a kill at any instant of their rewrite, whatever ``TMPDIR`` is.

Deterministic: the writer interrupted between the write and the rename, and the temporary file's
folder with ``TMPDIR`` elsewhere. Real: a process rewriting a checkpoint in a loop with ``TMPDIR``
on ``/dev/shm`` (another file system) is SIGKILLed at many moments; after every kill the file
loads and is one of the complete versions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnv3det.tasks.checkpoint_io import (
    TEMP_PREFIX,
    AtomicCheckpointIO,
    CheckpointWriteError,
    write_atomically,
)


def checkpoint(version: int, size: int = 1000) -> dict:
    return {"version": version, "weights": torch.full((size,), float(version))}


def test_interrupted_between_write_and_rename_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(1), path)

    def killed(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # the process is stopped after the write, before the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(checkpoint(2), path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # temp file removed


def test_temporary_file_is_in_the_checkpoint_folder_whatever_tmpdir(tmp_path, monkeypatch) -> None:
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def recording(src: str, dst: str) -> None:
        renames.append((Path(src), Path(dst)))
        assert list(elsewhere.iterdir()) == []  # nothing staged in TMPDIR
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(3), path)
    (src, dst), *_ = renames
    assert src.parent == dst.parent == path.parent and src.name.startswith(TEMP_PREFIX)
    assert torch.load(path, weights_only=True)["version"] == 3


def test_failed_write_names_the_folder_and_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    write_atomically(b"old", path)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointWriteError, match="disk is full") as err:
        write_atomically(b"new" * 1000, path)
    assert str(tmp_path) in str(err.value)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_remote_paths_keep_lightnings_writer(tmp_path, monkeypatch) -> None:
    called = []
    monkeypatch.setattr(
        "lightning.fabric.plugins.io.torch_io.TorchCheckpointIO.save_checkpoint",
        lambda self, ckpt, path, storage_options=None: called.append(str(path)),
    )
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), "memory://bucket/last.ckpt")
    assert called == ["memory://bucket/last.ckpt"]


REWRITER = """
import sys, torch
from mnv3det.tasks.checkpoint_io import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
version = 0
while True:
    version += 1
    io.save_checkpoint({"version": version, "weights": torch.full((2_000_000,), float(version))}, path)
    print(version, flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm (another file system)")
def test_sigkill_during_rewrites_with_tmpdir_on_another_file_system(tmp_path) -> None:
    shm = Path("/dev/shm") / f"mnv3det-test-{os.getpid()}"
    shm.mkdir(exist_ok=True)
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(shm), "OMP_NUM_THREADS": "1"}
    delays = [0.007 * k for k in range(1, 9)]  # kills land before, during and after writes
    seen_versions = []
    try:
        for delay in delays:
            proc = subprocess.Popen(
                [sys.executable, "-c", REWRITER, str(path)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                first = proc.stdout.readline()  # one complete file exists
                assert first.strip(), "the writer did not start"
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
            ckpt = torch.load(path, weights_only=True)  # never truncated
            version = ckpt["version"]
            assert torch.equal(ckpt["weights"], torch.full((2_000_000,), float(version)))
            seen_versions.append(version)
            assert list(shm.iterdir()) == []  # nothing was staged in TMPDIR
    finally:
        for leftover in shm.iterdir():
            leftover.unlink()
        shm.rmdir()
    print(f"versions found after {len(delays)} kills: {seen_versions}")
    # the next write removes the temporaries the kills left beside the file
    AtomicCheckpointIO().save_checkpoint(checkpoint(0), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_permissions_of_a_new_and_of_a_replaced_file(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        path = tmp_path / "last.ckpt"
        write_atomically(b"a", path)
        assert path.stat().st_mode & 0o777 == 0o644  # as a file torch.save creates, not 0600
        path.chmod(0o640)
        write_atomically(b"b", path)
        assert path.stat().st_mode & 0o777 == 0o640  # the replaced file's
    finally:
        os.umask(umask)
