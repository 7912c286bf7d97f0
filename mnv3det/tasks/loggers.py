"""A CSV logger that keeps a run's history when the run is resumed.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder already exists, so a run resumed
with ``--ckpt_path last`` (which continues in its own ``version_N`` folder, see
:mod:`mnv3det.cli.runs`) would lose every row written before the kill. This logger keeps the
file: on its first write it drops only the rows at or after the first step it logs (what the
killed run logged after its last checkpoint, which the resumed run logs again) and appends.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["CSVLogger", "ResumableExperimentWriter"]


class ResumableExperimentWriter(ExperimentWriter):
    """``ExperimentWriter`` that continues an existing ``metrics.csv`` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self._continuing = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        self._continuing = self._fs.isfile(self.metrics_file_path)

    def save(self) -> None:
        if self._continuing and self.metrics:
            self._continuing = False
            self._keep_rows_before(min(int(m.get("step", 0)) for m in self.metrics))
        super().save()

    def _keep_rows_before(self, first_step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step", "") == "" or int(r["step"]) < first_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(set(fields) | set(self.metrics_keys))


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` survives a resume (same arguments)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(log_dir=self.log_dir)
        return self._experiment
