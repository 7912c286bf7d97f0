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

Under SLURM (a batch job run through ``srun``/``sbatch``, where Lightning's auto-requeue is on) a
``fit`` also records its job in the run folder (``slurm_job``: the job id, ``ARRAYID_TASKID`` for
array jobs) and keeps Lightning's ``hpc_ckpt_N.ckpt`` there (``trainer.default_root_dir``, unless
the config sets it). A requeued job (same job id: SLURM requeues with the same id and counts
``SLURM_RESTART_COUNT``) continues in that folder from the newest of its ``hpc_ckpt_*.ckpt`` and
``checkpoints/last*.ckpt``, whatever ``--ckpt_path`` says; the other tasks of a multi-task job take
the folder that task 0 recorded.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

__all__ = ["find_last_checkpoint", "prepare_run_folder", "slurm_job_key"]

_VERSION = re.compile(r"^version_(\d+)$")
VERSION_ENV = "MNV3DET_RUN_VERSION"
SLURM_MARKER = "slurm_job"
"""File in a run folder naming the SLURM job that trains it."""
SLURM_WAIT_S = 300.0
"""How long the other tasks of a SLURM job wait for task 0 to record the run folder."""


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


class SlurmRunFolderError(TimeoutError):
    """Task 0 of a SLURM job did not record the run folder in time (no shared file system?)."""


def slurm_job_key() -> str | None:
    """This SLURM batch job's id (``ARRAYID_TASKID`` for array jobs); ``None`` outside one.

    A job counts when Lightning's ``SLURMEnvironment`` (and its auto-requeue) is used: tasks run
    by ``srun``/``sbatch`` (``SLURM_NTASKS`` set), not an interactive allocation (job name
    ``bash``/``interactive``).
    """
    if "SLURM_NTASKS" not in os.environ or "SLURM_JOB_ID" not in os.environ:
        return None
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def _folder_of_job(roots: list[Path], key: str) -> Path | None:
    for root in roots:
        for marker in sorted(root.glob(f"version_*/{SLURM_MARKER}")):
            try:
                if marker.read_text().strip() == key:
                    return marker.parent
            except OSError:
                continue
    return None


def _newest_state(folder: Path) -> Path | None:
    """The newest of Lightning's ``hpc_ckpt_*.ckpt`` and our ``checkpoints/last*.ckpt``."""
    found = [*folder.glob("hpc_ckpt_*.ckpt"), *folder.glob("checkpoints/last*.ckpt")]
    found = [p for p in found if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _slurm_requeued(cfg: Any, roots: list[Path], key: str) -> str | None:
    """The version folder of a requeued job (and its newest state in ``ckpt_path``), else None.

    Tasks other than task 0 wait for task 0 to record the folder of a new job.
    """
    folder = _folder_of_job(roots, key)
    deadline = time.monotonic() + SLURM_WAIT_S
    while folder is None and os.environ.get("SLURM_PROCID", "0") != "0":
        if time.monotonic() > deadline:
            raise SlurmRunFolderError(
                f"SLURM task {os.environ['SLURM_PROCID']}: task 0 of job {key} recorded no run "
                f"folder under {roots[0]} within {SLURM_WAIT_S:g} s; the tasks need a log "
                "folder on a file system they all see (trainer.logger save_dir)"
            )
        time.sleep(0.5)
        folder = _folder_of_job(roots, key)
    if folder is None:
        return None
    state = _newest_state(folder)
    restarts = os.environ.get("SLURM_RESTART_COUNT", "?")
    if state is not None:
        cfg["ckpt_path"] = str(state)
        rank_zero_info(
            f"[run] SLURM job {key} requeued (restart {restarts}): continuing {folder} from {state}"
        )
    else:
        rank_zero_info(
            f"[run] SLURM job {key} requeued (restart {restarts}): continuing in {folder}, which "
            "holds no checkpoint yet"
        )
    return folder.name


def _record_slurm_job(cfg: Any, folder: Path, key: str) -> None:
    if os.environ.get("SLURM_PROCID", "0") == "0":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SLURM_MARKER).write_text(key + "\n")
    trainer_cfg = cfg["trainer"]
    if _get(trainer_cfg, "default_root_dir") is None:
        # Lightning's SLURM auto-requeue saves hpc_ckpt_N.ckpt in default_root_dir: the run's
        # own folder, where a requeued job looks (and a new run does not)
        trainer_cfg["default_root_dir"] = str(folder)


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
    slurm_key = slurm_job_key() if subcommand == "fit" else None
    slurm_version = _slurm_requeued(cfg, roots, slurm_key) if slurm_key else None
    if slurm_version is not None:
        if cfg["ckpt_path"] == "last":  # the job's folder holds no state yet: start over in it
            cfg["ckpt_path"] = None
    elif ckpt_path == "last" and not _checkpoint_dirpaths(trainer_cfg):
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
    if slurm_version is not None:
        version = slurm_version  # the requeued job's own folder
    elif resumed is not None and subcommand == "fit":
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
    if slurm_key is not None:
        _record_slurm_job(cfg, roots[0] / version, slurm_key)
    for entry in entries:
        entry["init_args"]["version"] = version
