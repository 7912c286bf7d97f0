"""``mnv3det fit|validate|test|predict``: LightningCLI with one folder per run.

The config names the task (``model.class_path``) and the data module (``data.class_path``), so
detection and segmentation share one command. Before the classes are built,
:func:`mnv3det.cli.runs.prepare_run_folder` pins every logger to one ``version_N`` folder and
turns ``--ckpt_path last`` into the newest ``last.ckpt`` of that config's runs, and a
``--ckpt_path`` file is read by :func:`mnv3det.weights.read_checkpoint` first, so a missing,
truncated or foreign file is one of our errors naming it (printed as one line by the command).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from mnv3det.cli.runs import prepare_run_folder
from mnv3det.weights import CheckpointFormatError, read_checkpoint

#: ``ckpt_path`` values Lightning resolves itself.
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def check_ckpt_path(path: str) -> None:
    """Raise one of our errors, naming ``path``, unless it is a readable mnv3det ``.ckpt``."""
    ckpt = read_checkpoint(path)  # CheckpointNotFoundError / CheckpointReadError / Unsafe...
    if not ckpt.described_by:
        raise CheckpointFormatError(
            f"--ckpt_path {path}: not a checkpoint written by mnv3det fit (no model description "
            "or task hyper-parameters). To start from a weights file (e.g. torchvision's), pass "
            "it as --model.init_args.weights instead."
        )


__all__ = ["MnV3DetCLI", "run_lightning_cli"]


class MnV3DetCLI(LightningCLI):
    """LightningCLI whose runs resume with ``--ckpt_path last`` (see :mod:`mnv3det.cli.runs`)."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI's hook that reads the checkpoint's hyper-parameters into the config: the
        # run folder and "last" are resolved first, and the file is checked before torch.load.
        subcommand = self.config.get("subcommand")
        if subcommand:
            prepare_run_folder(self.config, subcommand)
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT_PATHS:
                check_ckpt_path(str(ckpt_path))
        super()._parse_ckpt_path()


def run_lightning_cli(args: list[str] | None) -> None:
    """Run the CLI with the task/data classes named in the config.

    Args:
        args: the subcommand and its arguments; ``None`` reads ``sys.argv`` (console script).
    """
    MnV3DetCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
