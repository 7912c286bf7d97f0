"""A SLURM job that Lightning's auto-requeue (or SLURM itself) requeues continues in its own run
folder from its newest state; other jobs and plain runs get their own folders.

SLURM is simulated with its environment variables and a fake ``scontrol`` on ``PATH`` that logs
its arguments (Lightning calls ``scontrol requeue JOBID`` on the requeue signal).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from jsonargparse import Namespace
from stop_runs import (
    ENV,
    STEPS_PER_EPOCH,
    finish,
    fit_args,
    last_step,
    logs_of,
    make_coco,
    run_fit,
    run_lines,
    start_fit,
    wait_until,
)

from mnv3det.cli import runs
from mnv3det.cli.runs import SLURM_MARKER, VERSION_ENV, prepare_run_folder


def slurm_env(job_id: str, restarts: int = 0) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        **({"SLURM_RESTART_COUNT": str(restarts)} if restarts else {}),
    }


def config(save_dir: Path, ckpt_path: str | None = None) -> Namespace:
    loggers = [
        Namespace(
            class_path=f"lightning.pytorch.loggers.{kind}",
            init_args=Namespace(save_dir=str(save_dir), name="exp", version=None),
        )
        for kind in ("CSVLogger", "TensorBoardLogger")
    ]
    trainer = Namespace(logger=loggers, callbacks=[], default_root_dir=None)
    return Namespace(subcommand="fit", fit=Namespace(trainer=trainer, ckpt_path=ckpt_path))


def prepared(cfg: Namespace) -> tuple[str, str | None, str | None]:
    prepare_run_folder(cfg, "fit")
    versions = {entry.init_args.version for entry in cfg.fit.trainer.logger}
    assert len(versions) == 1
    return versions.pop(), cfg.fit.ckpt_path, cfg.fit.trainer.default_root_dir


@pytest.fixture
def _slurm(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv(VERSION_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def set_job(job_id: str, restarts: int = 0) -> None:
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
        for key, value in slurm_env(job_id, restarts).items():
            monkeypatch.setenv(key, value)

    return set_job


def test_requeued_job_continues_its_folder_from_its_newest_state(tmp_path, _slurm) -> None:
    _slurm("100")
    version, ckpt, root_dir = prepared(config(tmp_path))
    folder = tmp_path / "exp" / version
    assert version == "version_0" and ckpt is None
    assert (folder / SLURM_MARKER).read_text().strip() == "100"
    assert root_dir == str(folder)  # Lightning's hpc_ckpt_N.ckpt go into the run folder

    _slurm("200")  # another job: a new run
    version, ckpt, _ = prepared(config(tmp_path))
    assert version == "version_1" and ckpt is None

    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    time.sleep(0.01)
    (folder / "hpc_ckpt_1.ckpt").write_bytes(b"x")  # newer: written on the requeue signal
    _slurm("100", restarts=1)
    version, ckpt, _ = prepared(config(tmp_path, ckpt_path="some/other.ckpt"))
    assert version == "version_0" and ckpt == str(folder / "hpc_ckpt_1.ckpt")

    os.utime(folder / "checkpoints" / "last.ckpt")  # the stop on SIGTERM came after it
    version, ckpt, _ = prepared(config(tmp_path))
    assert version == "version_0" and ckpt == str(folder / "checkpoints" / "last.ckpt")


def test_requeued_job_without_state_starts_over_in_its_folder(tmp_path, _slurm) -> None:
    _slurm("300")
    assert prepared(config(tmp_path))[0] == "version_0"
    _slurm("300", restarts=1)
    assert prepared(config(tmp_path, ckpt_path="last")) == (
        "version_0",
        None,
        str(tmp_path / "exp" / "version_0"),
    )


def test_array_jobs_are_told_apart(tmp_path, _slurm, monkeypatch) -> None:
    for task in ("1", "2"):
        _slurm("400")
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "400")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert prepared(config(tmp_path))[0] == f"version_{int(task) - 1}"
    assert (tmp_path / "exp/version_1" / SLURM_MARKER).read_text().strip() == "400_2"


def test_interactive_allocation_is_not_a_job(tmp_path, _slurm, monkeypatch) -> None:
    _slurm("500")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    prepared(config(tmp_path))
    assert not (tmp_path / "exp/version_0" / SLURM_MARKER).exists()


@pytest.mark.slow
def test_auto_requeue_signal_then_sigterm_then_the_requeued_job_continues(tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    env = {
        **ENV,
        **slurm_env("4242"),
        "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }
    args = fit_args(make_coco(tmp_path / "coco"))
    folder = logs_of(tmp_path) / "version_0"

    proc = start_fit(args, tmp_path, env=env)
    wait_until(proc, lambda: last_step(tmp_path) >= STEPS_PER_EPOCH, "the first last.ckpt")
    proc.send_signal(signal.SIGUSR1)  # sbatch --signal=USR1@N: Lightning saves and requeues
    wait_until(proc, lambda: any(folder.glob("hpc_ckpt_*.ckpt")), "Lightning's hpc checkpoint")
    wait_until(proc, lambda: (tmp_path / "scontrol.log").exists(), "scontrol requeue")
    proc.send_signal(signal.SIGTERM)  # SLURM ends the requeued job's current run
    code, out = finish(proc)
    print("\n".join(run_lines(out)))
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    stopped_at = last_step(tmp_path)
    assert stopped_at > STEPS_PER_EPOCH

    # the requeued job: same job id, same command line (no --ckpt_path)
    code, out = run_fit(args, tmp_path, env={**env, **slurm_env("4242", restarts=1)})
    print("\n".join(run_lines(out)))
    assert code == 0, out[-3000:]
    assert (
        f"[run] SLURM job 4242 requeued (restart 1): continuing {folder.relative_to(tmp_path)}"
        in out
    )
    assert str(folder.relative_to(tmp_path) / "checkpoints" / "last.ckpt") in out
    assert sorted(p.name for p in logs_of(tmp_path).iterdir()) == ["version_0"]
    assert last_step(tmp_path) == 4 * STEPS_PER_EPOCH


def test_other_tasks_take_task_0s_folder(tmp_path, _slurm, monkeypatch) -> None:
    (tmp_path / "exp/version_0").mkdir(parents=True)  # an older run
    _slurm("600")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setattr(runs, "SLURM_WAIT_S", 0.2)
    with pytest.raises(runs.SlurmRunFolderError, match="task 0 of job 600 recorded no run folder"):
        prepared(config(tmp_path))  # task 0 has not started yet
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert prepared(config(tmp_path))[0] == "version_1"
    (tmp_path / "exp/version_2").mkdir()  # e.g. another run started meanwhile
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.delenv(VERSION_ENV)
    assert prepared(config(tmp_path))[0] == "version_1"
