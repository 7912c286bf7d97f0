"""The end-of-run data report of the data modules: one ``[data]`` summary and ``skipped.csv``.

At the end of ``fit``, ``validate``, ``test`` and ``predict`` (Lightning calls the data module's
``teardown``), and when a run stops on an exception (``on_exception``), a data module with this
mixin prints ``stats.report()`` of each data set it used (rank zero only) and writes every
problem to ``<trainer.log_dir>/skipped.csv`` (columns split, file, reason, detail). Problems found
while reading items in DataLoader workers are included (shared memory) and a file counts once
however often it was read. Being the data module's own hooks, no callback has to be added to the
trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from mnv3det.data.problems import write_problems
from mnv3det.tasks.folders import run_folder

__all__ = ["DataReport", "report_train_plan"]


def report_train_plan(plan: str) -> None:
    """Print, when training starts, what an epoch uses of the training set (rank zero).

    ``plan`` is :func:`mnv3det.data.sampling.epoch_plan`'s line, e.g. ``train: 9 images, batch
    4: 2 batches per epoch, the last 1 image of each epoch's order is left out ...``.
    """
    rank_zero_info(f"[data] {plan}")


class DataReport:
    """Mixin for LightningDataModules that define ``datasets_in_use(stage)``.

    Attributes:
        skipped_file_name: the CSV file's name in the run folder.
        data_summary: the last summary printed (without the ``[data]`` prefixes).
        skipped_written: the CSV written by the last report, if there were problems.
    """

    skipped_file_name = "skipped.csv"
    data_summary: str = ""
    skipped_written: Path | None = None
    _reported_stage: str | None = None

    def datasets_in_use(self, stage: str) -> list[Any]:  # pragma: no cover - defined by the modules
        raise NotImplementedError

    def teardown(self, stage: str) -> None:
        """Lightning's end-of-stage hook: report once."""
        self.report_data(stage)

    def on_exception(self, exception: BaseException) -> None:
        """Lightning's hook when a run stops on an exception: report what was found so far."""
        trainer = getattr(self, "trainer", None)
        self.report_data(str(getattr(getattr(trainer, "state", None), "fn", None) or "fit"))

    def report_data(self, stage: str) -> None:
        """Print the summary of ``stage``'s data sets and write ``skipped.csv`` (rank zero)."""
        trainer = getattr(self, "trainer", None)
        if self._reported_stage == stage or (trainer is not None and trainer.global_rank != 0):
            return
        self._reported_stage = stage
        datasets = [d for d in self.datasets_in_use(stage) if getattr(d, "stats", None) is not None]
        if not datasets:
            return
        problems = [row for d in datasets for row in d.stats.problems]
        lines = [d.stats.report() for d in datasets]
        self.skipped_written = None
        if problems:
            folder = run_folder(trainer) if trainer is not None else Path(".")
            self.skipped_written = write_problems(
                folder.resolve() / self.skipped_file_name, problems
            )
            files = len({(row.split, row.file) for row in problems})
            lines.append(
                f"{len(problems)} problems in {files} files, each with its reason: "
                f"{self.skipped_written}"
            )
        else:
            lines.append("nothing was skipped, dropped or unreadable")
        self.data_summary = "\n".join(lines)
        rank_zero_info("\n".join(f"[data] {line}" for line in self.data_summary.splitlines()))
