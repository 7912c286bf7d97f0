"""Checkpoint files that a kill or a full disk cannot destroy.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction, which stages the file in
``TMPDIR`` and moves it into place on commit. When ``TMPDIR`` is another file system (a tmpfs
``/tmp``, a node-local disk beside a shared log folder) that move is a copy onto the final name,
and a kill during the copy leaves a truncated ``last.ckpt``. :class:`AtomicCheckpointIO` writes
every local checkpoint to a temporary file in the checkpoint's own folder, flushes and fsyncs
it, then ``os.replace``-s it over the old file: at any instant the path holds either the old
checkpoint or the new one, whatever ``TMPDIR`` is. Remote paths (``s3://`` ...) keep Lightning's
writer.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "write_atomically"]

TEMP_PREFIX = ".tmp-"
"""Name prefix of the temporary files (left behind only by a kill; removed by the next write)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the old file is intact."""


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _permissions(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a fsync'ed temporary file in the same folder.

    Args:
        data: the whole file.
        path: the destination; replaced in one step (``os.replace``).

    Raises:
        CheckpointWriteError: the folder is full or not writable; ``path`` keeps its old content.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=folder)
    except OSError as err:
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {err.strerror or err}; free space or fix the "
            f"permissions of {folder} (the previous checkpoint there is intact)"
        ) from err
    try:
        # mkstemp makes the file private (0600); a checkpoint gets the permissions of the file
        # it replaces, or those of any new file (0666 less the umask), as torch.save would give
        os.fchmod(fd, _permissions(path))
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(err, OSError):
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = "the disk is full" if full else (err.strerror or str(err))
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {reason} in {folder}; free space there or "
                "point the run elsewhere (the previous checkpoint there is intact)"
            ) from err
        raise
    _fsync_folder(folder)
    _remove_stale_temporaries(path)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` that a killed writer left behind.

    One process writes a given checkpoint file, so once its new version is in place every other
    temporary of that name is a leftover.
    """
    for stale in path.parent.glob(f"{TEMP_PREFIX}{path.name}.*"):
        with contextlib.suppress(OSError):
            stale.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local files are replaced atomically (see the module doc).

    The CLI installs it in every trainer it builds; pass it to a ``Trainer`` of your own with
    ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(buffer.getbuffer(), path)
