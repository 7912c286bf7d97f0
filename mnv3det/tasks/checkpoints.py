"""Keep Lightning ``.ckpt`` files loadable with ``torch.load(weights_only=True)``.

:mod:`mnv3det.weights` refuses checkpoints that need arbitrary unpickling; a task's saved
hyper-parameters can hold ``pathlib.Path`` objects (e.g. the data module's ``root``) or mapping
subclasses, which ``weights_only`` loading rejects. Both tasks call :func:`make_checkpoint_safe`
from ``on_save_checkpoint`` so their checkpoints load through ``weights=`` and ``mnv3det export``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


def plain(value: Any) -> Any:
    """Paths -> str and mapping subclasses -> dict, recursively (safe-unpicklable types only)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value


def make_checkpoint_safe(checkpoint: dict[str, Any]) -> None:
    """Rewrite the hyper-parameters of a checkpoint dict in place with plain types."""
    for key in HPARAM_KEYS:
        if key in checkpoint:
            checkpoint[key] = plain(checkpoint[key])
