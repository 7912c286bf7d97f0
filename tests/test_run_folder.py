"""One run = one folder: both loggers share a version, ``--ckpt_path last`` finds the newest run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from jsonargparse import Namespace

from mnv3det.cli.runs import VERSION_ENV, prepare_run_folder


def config(save_dir: Path, ckpt_path: str | None = None, dirpath: str | None = None) -> Namespace:
    loggers = [
        Namespace(
            class_path=f"lightning.pytorch.loggers.{kind}",
            init_args=Namespace(save_dir=str(save_dir), name="exp", version=None),
        )
        for kind in ("CSVLogger", "TensorBoardLogger")
    ]
    callbacks = [Namespace(class_path="mnv3det.tasks.checkpoints.LastCheckpoint",
                           init_args=Namespace(dirpath=dirpath, every_n_train_steps=0))]  # fmt: skip
    trainer = Namespace(logger=loggers, callbacks=callbacks)
    return Namespace(subcommand="fit", fit=Namespace(trainer=trainer, ckpt_path=ckpt_path))


def versions(cfg: Namespace) -> set[str]:
    return {entry.init_args.version for entry in cfg.fit.trainer.logger}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(VERSION_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_new_runs_take_the_next_version_for_every_logger(tmp_path) -> None:
    cfg = config(tmp_path)
    prepare_run_folder(cfg, "fit")
    assert versions(cfg) == {"version_0"}
    (tmp_path / "exp/version_0").mkdir(parents=True)
    (tmp_path / "exp/version_3").mkdir()  # e.g. left by another logger
    cfg = config(tmp_path)
    prepare_run_folder(cfg, "fit")
    assert versions(cfg) == {"version_4"}


def test_ckpt_path_last_continues_the_newest_run_in_its_folder(tmp_path) -> None:
    for name in ("version_0", "version_1"):
        folder = tmp_path / "exp" / name / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
        time.sleep(0.01)
    (tmp_path / "exp/version_2").mkdir()  # a validate run: no checkpoints
    os.utime(tmp_path / "exp/version_0/checkpoints/last.ckpt")  # newest now
    cfg = config(tmp_path, ckpt_path="last")
    prepare_run_folder(cfg, "fit")
    assert versions(cfg) == {"version_0"}
    assert cfg.fit.ckpt_path == str(tmp_path / "exp/version_0/checkpoints/last.ckpt")


def test_ckpt_path_last_without_a_checkpoint_starts_a_new_run(tmp_path, capsys) -> None:
    cfg = config(tmp_path, ckpt_path="last")
    prepare_run_folder(cfg, "fit")
    assert cfg.fit.ckpt_path is None and versions(cfg) == {"version_0"}


def test_explicit_dirpath_keeps_lightnings_lookup(tmp_path) -> None:
    cfg = config(tmp_path, ckpt_path="last", dirpath=str(tmp_path / "ckpts"))
    prepare_run_folder(cfg, "fit")
    assert cfg.fit.ckpt_path == "last"


def test_ddp_processes_reuse_rank_zeros_folder(tmp_path, monkeypatch) -> None:
    cfg = config(tmp_path)
    prepare_run_folder(cfg, "fit")  # rank 0
    (tmp_path / "exp/version_0").mkdir(parents=True)  # rank 0 created it meanwhile
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = config(tmp_path)
    prepare_run_folder(cfg, "fit")
    assert versions(cfg) == {"version_0"}
