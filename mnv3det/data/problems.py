"""What a data set left out, changed or could not read, per file, and its end-of-run summary.

Every data set (:class:`mnv3det.data.coco.CocoDetection`, :class:`mnv3det.data.cityscapes.
CityscapesSegmentation` and the prediction folders) keeps a :class:`DatasetStats`:

* ``counts``: totals made while the index is built (images used, boxes used, clipped, ...);
* :attr:`DatasetStats.problems`: one :class:`Problem` ``(split, file, reason, detail)`` per file
  (or annotation) that was skipped or changed, found by the scan at setup, in the main process;
* a shared-memory flag per item for what is found only when an item is read (a file that became
  unreadable after the scan), so flags set inside DataLoader workers are seen by the main process
  and a file read in several epochs counts once.

:func:`write_problems` writes the rows as CSV (``skipped.csv`` in the run's log folder) and
:meth:`DatasetStats.report` gives the summary printed at the end of ``fit``, ``validate`` and
``predict``; it counts files, not events.

An item that cannot be read mid-run in skip mode is returned as a :class:`SkippedSample`: an empty
item (a black image with no boxes / an all-ignore mask, which gives zero loss) that the collate
functions leave out of the batch (:func:`drop_skipped`). A batch whose every item was skipped keeps
one such empty item, so the step still runs (with zero loss) instead of crashing.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FILE_SKIP_HINT",
    "PROBLEM_COLUMNS",
    "REASONS",
    "DatasetStats",
    "Problem",
    "SkippedSample",
    "drop_skipped",
    "unreadable_file_error",
    "write_problems",
]

FILE_SKIP_HINT = "or set on_error='skip' (data.on_error: skip) to leave it out and list it"
"""The fix a strict-mode error about one file suggests besides replacing the file."""


def unreadable_file_error(err: Exception) -> Exception:
    """``err`` (a file the header scan could not read) with the fix appended, same type."""
    return type(err)(f"{err}; replace or remove the file, {FILE_SKIP_HINT}")


PROBLEM_COLUMNS = ("split", "file", "reason", "detail")

REASONS: dict[str, str] = {
    # whole files / images: the item is not in the index
    "missing_file": "image file missing",
    "unreadable_file": "image file unreadable (empty, not an image, truncated)",
    "size_mismatch": "file size disagrees with the annotation file's width/height",
    "duplicate_image_id": "image id listed more than once in the annotation file",
    "bad_image_entry": "image entry without a usable id / file_name",
    "missing_label": "label file missing",
    "unreadable_label": "label file unreadable",
    "label_size_mismatch": "image and label file of different sizes",
    "unknown_label_ids": "label values outside the known ids",
    # annotations: the annotation is not trained on, the image stays
    "unknown_category": "annotation with an unknown category id (annotation dropped)",
    "unknown_image_id": "annotation of an image id not in the file (annotation ignored)",
    "bad_box": "box not 4 finite numbers (dropped)",
    "degenerate_box": "box with no area or under min_box_size after clipping (dropped)",
    "outside_box": "box wholly outside the image (dropped)",
    # found when an item is read (after the scan): the item is left out of its batch
    "unreadable_when_read": "file unreadable when read (changed after the scan; left out)",
    "size_changed_when_read": "file size changed after the scan (left out)",
}
IMAGE_REASONS = frozenset(
    {
        "missing_file",
        "unreadable_file",
        "size_mismatch",
        "duplicate_image_id",
        "bad_image_entry",
        "missing_label",
        "unreadable_label",
        "label_size_mismatch",
        "unknown_label_ids",
    }
)
RUNTIME_REASONS = ("unreadable_when_read", "size_changed_when_read")


@dataclass(frozen=True)
class Problem:
    """One row of ``skipped.csv``.

    Attributes:
        split: the data set's split (``train2017``, ``val``, ``predict``, ...).
        file: the image (or annotation) file, as the data set names it.
        reason: a key of :data:`REASONS`.
        detail: what exactly, e.g. the annotation id and its box.
    """

    split: str
    file: str
    reason: str
    detail: str


class SkippedSample(tuple):
    """An ``(image, target)`` item standing in for one that could not be read mid-run.

    It is a real, empty item (so code that does not know about it still works and gets zero
    loss from it); :func:`drop_skipped` leaves it out of batches.
    """

    __slots__ = ()


def drop_skipped(batch: Sequence[Any]) -> list[Any]:
    """The items of ``batch`` that are not :class:`SkippedSample` (one kept if all are)."""
    kept = [item for item in batch if not isinstance(item, SkippedSample)]
    return kept if kept or not batch else [batch[0]]


class DatasetStats:
    """Counters and per-file problems of one data set (see the module docstring).

    Args:
        name: the data set's name in reports, e.g. ``CocoDetection[train2017]``.
        split: the split written in the ``split`` column.
    """

    def __init__(self, name: str, split: str = "") -> None:
        self.name = name
        self.split = split
        self.counts: Counter[str] = Counter()
        self._problems: list[Problem] = []
        self._item_files: list[str] = []
        self._runtime = torch.zeros(0, dtype=torch.int8)

    # ------------------------------------------------------------------ scan time
    def add(self, file: str | Path, reason: str, detail: str = "") -> None:
        """Record a problem found while indexing (main process)."""
        if reason not in REASONS:
            raise KeyError(f"unknown problem reason {reason!r}; expected one of {list(REASONS)}")
        self._problems.append(Problem(self.split, str(file), reason, detail))

    def set_items(self, files: Sequence[str | Path]) -> None:
        """Declare the files of the final index (one run-time flag each, in shared memory)."""
        self._item_files = [str(f) for f in files]
        self._runtime = torch.zeros(len(files), dtype=torch.int8).share_memory_()

    # ------------------------------------------------------------------ read time
    def flag(self, index: int, reason: str) -> None:
        """Mark item ``index`` as left out when read (``reason`` in :data:`RUNTIME_REASONS`);
        safe in DataLoader workers, and a file flagged in several epochs counts once."""
        self._runtime[index] = RUNTIME_REASONS.index(reason) + 1

    def add_runtime(self, key: str, n: int = 1) -> None:  # backward compatibility
        """Count ``n`` events under ``key`` (main process only)."""
        self.counts[key] += n

    # ------------------------------------------------------------------ results
    @property
    def problems(self) -> list[Problem]:
        """Every problem: those of the scan, then the files flagged when read."""
        rows = list(self._problems)
        for index in torch.nonzero(self._runtime).flatten().tolist():
            reason = RUNTIME_REASONS[int(self._runtime[index]) - 1]
            rows.append(
                Problem(
                    self.split,
                    self._item_files[index],
                    reason,
                    "the file passed the scan at setup but could not be used when read; "
                    "its item was left out of its batches",
                )
            )
        return rows

    def files_by_reason(self) -> Counter[str]:
        """Number of distinct files per reason."""
        files: dict[str, set[str]] = {}
        for row in self.problems:
            files.setdefault(row.reason, set()).add(row.file)
        return Counter({reason: len(names) for reason, names in files.items()})

    def as_dict(self) -> dict[str, int]:
        """The counters plus, per reason, the number of files (``files_<reason>``)."""
        out = {k: int(v) for k, v in self.counts.items()}
        out.update({f"files_{k}": v for k, v in self.files_by_reason().items()})
        return out

    def __getitem__(self, key: str) -> int:
        return self.as_dict().get(key, 0)

    def report(self) -> str:
        """The summary: what is used, then each kind of problem with its number of files."""
        c = self.counts
        head = f"{self.name}: {c.get('images_used', 0)} of {c.get('images_listed', 0)} images used"
        if c.get("empty_images_kept", 0):
            head += f" ({c['empty_images_kept']} without boxes, kept as negatives)"
        parts = [head + (f", {c['boxes_used']} boxes" if "boxes_used" in c else "")]
        for key, text in (
            ("empty_images_skipped", "images without boxes skipped (empty_images='skip')"),
            ("crowd_boxes_excluded", "crowd boxes not trained on (kept for evaluation)"),
            ("boxes_clipped", "boxes clipped to the image"),
            ("sizes_taken_from_files", "images without width/height sized from their files"),
        ):
            if c.get(key, 0):
                parts.append(f"{c[key]} {text}")
        lines = ["; ".join(parts)]
        by_reason = self.files_by_reason()
        for reason, text in REASONS.items():
            n = by_reason.get(reason, 0)
            if not n:
                continue
            files = f"{n} file{'s' if n != 1 else ''}"
            if reason in IMAGE_REASONS or reason in RUNTIME_REASONS:
                lines.append(f"  left out {files}: {text}")
            else:
                events = c.get(f"{reason}_count", n)
                lines.append(
                    f"  {events} annotation{'s' if events != 1 else ''} in {files}: {text}"
                )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DatasetStats({self.report()})"


def write_problems(path: str | Path, problems: Iterable[Problem]) -> Path:
    """Write problems as CSV with the columns :data:`PROBLEM_COLUMNS`.

    Args:
        path: the CSV file (its folder is created).
        problems: the rows.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PROBLEM_COLUMNS)
        for row in problems:
            writer.writerow([row.split, row.file, row.reason, row.detail])
    return path
