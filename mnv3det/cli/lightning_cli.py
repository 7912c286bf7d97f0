"""``mnv3det fit|validate|test|predict``: LightningCLI with one folder per run.

The config names the task (``model.class_path``) and the data module (``data.class_path``), so
detection and segmentation share one command. Before the classes are built,
:func:`mnv3det.cli.runs.prepare_run_folder` pins every logger to one ``version_N`` folder and
turns ``--ckpt_path last`` into the newest ``last.ckpt`` of that config's runs.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from mnv3det.cli.runs import prepare_run_folder

__all__ = ["MnV3DetCLI", "run_lightning_cli"]


class MnV3DetCLI(LightningCLI):
    """LightningCLI whose runs resume with ``--ckpt_path last`` (see :mod:`mnv3det.cli.runs`)."""

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand:
            prepare_run_folder(self.config, subcommand)


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
