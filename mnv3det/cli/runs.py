"""One run = one folder: the loggers' version and ``--ckpt_path last`` for ``mnv3det fit``.

Left alone, each Lightning logger picks its own ``version_N`` (the CSV and TensorBoard loggers of
our configs would pick two different ones) and ``--ckpt_path last`` looks for ``last.ckpt`` in the
*new* run's empty folder, so it never resumes. Before the classes are built, this module:

* gives every configured logger the same version, so a run has one folder
  ``save_dir/name/version_N/`` (metrics, TensorBoard events, ``checkpoints/``);
* for ``--ckpt_path last``: finds the newest ``last.ckpt`` among the runs of that config
  (``save_dir/name/version_*/checkpoints/``), continues that run in its own folder and passes
  the file to Lightning; with no such file a new run starts, and says so;
* for a new ``fit``: takes the next free ``version_N`` across all loggers' folders (the DDP
  processes Lightning starts inherit rank 0's choice through ``MNV3DET_RUN_VERSION``).

Callbacks with an explicit ``dirpath`` keep Lightning's own ``last`` lookup in that folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

__all__ = ["find_last_checkpoint", "prepare_run_folder"]

_VERSION = re.compile(r"^version_(\d+)$")
VERSION_ENV = "MNV3DET_RUN_VERSION"


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    """``namespace[key]`` of a jsonargparse Namespace (or dict), ``default`` when absent/None."""
    value = namespace.get(key, default) if hasattr(namespace, "get") else default
    return default if value is None else value


def _logger_entries(trainer_cfg: Any) -> list[Any]:
    """The configured logger entries that write to ``save_dir/name/version`` folders."""
    loggers = _get(trainer_cfg, "logger")
    if loggers is None or isinstance(loggers, bool):
        return []
    if not isinstance(loggers, list):
        loggers = [loggers]
    entries = []
    for entry in loggers:
        init = _get(entry, "init_args")
        if init is not None and "save_dir" in init:
            entries.append(entry)
    return entries


def _root(entry: Any) -> Path:
    init = entry["init_args"]
    return Path(str(_get(init, "save_dir", "."))) / str(_get(init, "name", "lightning_logs"))


def _checkpoint_dirpaths(trainer_cfg: Any) -> list[str]:
    callbacks = _get(trainer_cfg, "callbacks", [])
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    paths = []
    for callback in callbacks:
        init = _get(callback, "init_args")
        if init is not None and "dirpath" in init and init["dirpath"]:
            paths.append(str(init["dirpath"]))
    return paths


def find_last_checkpoint(root: Path) -> Path | None:
    """The newest ``version_*/checkpoints/last*.ckpt`` under a logger's ``save_dir/name``."""
    candidates = [p for p in root.glob("version_*/checkpoints/last*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _next_version(roots: list[Path]) -> int:
    versions = [
        int(m[1])
        for root in roots
        if root.is_dir()
        for child in root.iterdir()
        if (m := _VERSION.match(child.name))
    ]
    return max(versions, default=-1) + 1


def prepare_run_folder(config: Any, subcommand: str) -> None:
    """Pin the loggers to one run folder and resolve ``ckpt_path: last`` (edits ``config``).

    Args:
        config: the parsed LightningCLI config (``config[subcommand]`` has ``trainer`` and
            ``ckpt_path``).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
    """
    cfg = config[subcommand]
    trainer_cfg = cfg["trainer"]
    entries = _logger_entries(trainer_cfg)
    ckpt_path = _get(cfg, "ckpt_path")
    if not entries:
        return  # Lightning's defaults: no logger folders to reconcile
    roots = [_root(e) for e in entries]
    explicit = [str(_get(e["init_args"], "version", "")) for e in entries]
    explicit = [v for v in explicit if v]
    resumed: Path | None = None
    if ckpt_path == "last" and not _checkpoint_dirpaths(trainer_cfg):
        found = [p for p in (find_last_checkpoint(r) for r in roots) if p is not None]
        if found:
            resumed = max(found, key=lambda p: p.stat().st_mtime)
            cfg["ckpt_path"] = str(resumed)
            rank_zero_info(f"[run] --ckpt_path last: continuing from {resumed}")
        else:
            cfg["ckpt_path"] = None
            rank_zero_info(
                f"[run] --ckpt_path last: no last.ckpt under {roots[0]}/version_*/checkpoints; "
                "starting a new run"
            )
    if resumed is not None and subcommand == "fit":
        version = resumed.parent.parent.name  # continue in the run's own folder
    elif explicit:
        version = explicit[0]
    elif os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(VERSION_ENV):
        # A DDP process started by Lightning's launcher: rank 0 chose the folder (it may
        # already exist, so counting folders here would pick the next one).
        version = os.environ[VERSION_ENV]
    else:
        version = f"version_{_next_version(roots)}"
    os.environ[VERSION_ENV] = version  # inherited by the processes the DDP launcher starts
    for entry in entries:
        entry["init_args"]["version"] = version
