"""Kill-and-resume runs of the real ``mnv3det fit`` command, shared by the resume tests and
``tools/resume_sweep.py``.

The helpers start ``python -m mnv3det.cli fit`` subprocesses (CPU, one thread each), SIGKILL one
at a chosen point, resume it with ``--ckpt_path last`` and compare its final ``last.ckpt`` with an
uninterrupted run's: same global step, bit-identical weights (EMA included) and optimiser
momenta. :func:`draw_combos` draws a seeded random matrix of training options and kill points,
:func:`run_combo` runs one of them; every subprocess has a timeout.
"""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mnv3det.cli.runs import find_last_checkpoint
from mnv3det.data.synthetic_cityscapes import generate_street_scenes
from mnv3det.data.synthetic_coco import generate_shapes_coco

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STARTED = "[data] train:"
"""Printed when the training loader is made, before the first step (a kill point)."""

KillWhen = Callable[[int | None, str], bool]
"""``(global step of last.ckpt or None, output so far) -> kill now?``"""


def config_saving_every_step(name: str, folder: Path, every: int = 1) -> str:
    """The shipped config with ``LastCheckpoint(every_n_train_steps=every)``, as a user would
    edit it, written to ``folder``."""
    text = (REPO / "configs" / name).read_text()
    assert "every_n_train_steps: 0" in text
    path = folder / name
    path.write_text(text.replace("every_n_train_steps: 0", f"every_n_train_steps: {every}"))
    return str(path)


def run(
    args: list[str], cwd: Path, *extra: str, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``mnv3det fit`` to its end; assert it succeeded without dependency noise."""
    proc = subprocess.run(
        [sys.executable, "-m", "mnv3det.cli", "fit", *args, *extra],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no dependency noise a user cannot act on (mnv3det.cli.quiet)
    assert "litlogger" not in proc.stderr and "LeafSpec" not in proc.stderr
    return proc


def global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def run_and_kill(
    args: list[str], cwd: Path, logs: Path, kill_when: KillWhen, timeout: float = 600
) -> int | None:
    """Start a fit and SIGKILL it as soon as ``kill_when(step of last.ckpt, output)`` holds (the
    process goes on training while it is being killed).

    Returns:
        The global step of ``last.ckpt`` right after the kill (``None``: there is none).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnv3det.cli", "fit", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    deadline, seen, step = time.monotonic() + timeout, None, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            last = find_last_checkpoint(logs)
            if last is not None and last.stat().st_mtime_ns != seen:
                seen = last.stat().st_mtime_ns
                step = global_step(last)
            if kill_when(step, "".join(output)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    reader.join(timeout=10)
    text = "".join(output)
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself:\n{text[-3000:]}"
    last = find_last_checkpoint(logs)
    return None if last is None else global_step(last)


def metric_steps(path: Path) -> list[int]:
    with open(path, newline="") as file:
        return sorted({int(row["step"]) for row in csv.DictReader(file)})


def validation_steps(path: Path) -> list[int]:
    """The steps of ``metrics.csv`` rows with a validation metric (``val/...`` columns)."""
    with open(path, newline="") as file:
        return sorted({
            int(row["step"])
            for row in csv.DictReader(file)
            if any(k.startswith("val") and v not in ("", None) for k, v in row.items())
        })  # fmt: skip


def state_of(path: Path) -> tuple[int, dict[str, torch.Tensor], list]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"], ckpt["optimizer_states"]


@dataclass
class Comparison:
    """Two runs' final checkpoints side by side."""

    step_a: int
    step_b: int
    max_weight_diff: float
    different_weights: list[str]
    momenta_equal: bool

    @property
    def equal(self) -> bool:
        return self.step_a == self.step_b and not self.different_weights and self.momenta_equal


def compare_runs(killed: Path, uninterrupted: Path) -> Comparison:
    """Compare the final checkpoints: step, every weight and buffer, the SGD momenta."""
    step_a, weights_a, optim_a = state_of(uninterrupted)
    step_b, weights_b, optim_b = state_of(killed)
    assert weights_a.keys() == weights_b.keys()
    max_diff = max(
        (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        for a, b in ((weights_a[k], weights_b[k]) for k in weights_a)
    )
    different = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    momenta_a = [s["momentum_buffer"] for s in optim_a[0]["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in optim_b[0]["state"].values()]
    momenta_equal = len(momenta_a) == len(momenta_b) and all(
        torch.equal(a, b) for a, b in zip(momenta_a, momenta_b)
    )
    return Comparison(step_a, step_b, max_diff, different, momenta_equal)


def assert_same_run(killed: Path, uninterrupted: Path) -> None:
    """Same final step, bit-identical weights and momenta (prints the largest difference)."""
    result = compare_runs(killed, uninterrupted)
    print(f"final step {result.step_a}, max weight difference {result.max_weight_diff:g}")
    assert result.step_a == result.step_b, (result.step_a, result.step_b)
    assert not result.different_weights, result.different_weights[:5]
    assert result.momenta_equal


# ---------------------------------------------------------------------------- the matrix

COMMON = [
    *["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.benchmark", "false"],
    *["--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1"],
    *["--data.pin_memory", "false", "--seed_everything", "7"],
]
CONFIGS = {
    "detection": "ssdlite320_mnv3_small_coco.yaml",
    "segmentation": "lraspp_mnv3_small_cityscapes.yaml",
}
KILLS = ("start", "mid_epoch", "epoch_end", "validation")


@dataclass(frozen=True)
class Combo:
    """One draw of the matrix.

    Detection trains ``length`` epochs (epoch-based, as its config), segmentation ``length``
    optimiser steps (step-based, ``max_epochs: -1``, as its config).
    """

    task: str
    images: int
    batch: int
    limit: int | float | None  # trainer.limit_train_batches
    val_interval: int | float | None  # trainer.val_check_interval
    val_every: int | None  # trainer.check_val_every_n_epoch
    accumulate: int
    clip: float | None
    ema: bool
    workers: int
    every_n: int  # LastCheckpoint(every_n_train_steps)
    kill: str
    kill_step: int  # kill once last.ckpt holds this step or a later one (0: at STARTED)
    length: int

    @property
    def batches_per_epoch(self) -> int:
        full = self.images // self.batch  # the incomplete last batch is left out
        if self.limit is None:
            return full
        if isinstance(self.limit, float):
            return int(full * self.limit)
        return min(full, self.limit)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.accumulate)

    @property
    def total_steps(self) -> int:
        return self.length * self.steps_per_epoch if self.task == "detection" else self.length

    def options(self) -> str:
        """The drawn options, short (for the sweep's table)."""
        parts = [
            f"{self.task[:3]} n={self.images} b={self.batch}",
            f"limit={self.limit}" if self.limit is not None else "",
            f"vci={self.val_interval}" if self.val_interval is not None else "",
            f"cve={self.val_every}",
            f"acc={self.accumulate}" if self.accumulate > 1 else "",
            f"clip={self.clip}" if self.clip else "",
            "ema" if self.ema else "",
            f"w={self.workers} every={self.every_n}",
            ("epochs=" if self.task == "detection" else "steps=") + str(self.length),
        ]
        return " ".join(p for p in parts if p)

    def args(self, data: Path, folder: Path) -> list[str]:
        """The ``mnv3det fit`` arguments: the shipped config shrunk from the command line."""
        config = config_saving_every_step(CONFIGS[self.task], folder, self.every_n)
        args = [*["--config", config, *COMMON], "--data.root", str(data)]
        args += ["--data.num_workers", str(self.workers), "--data.batch_size", str(self.batch)]
        if self.task == "detection":
            args += [
                *["--data.label_map", "contiguous", "--data.zoom_out_max_scale", "2.0"],
                *["--data.photometric", "true", "--data.val_split", "val2017"],
                *["--model.num_classes", "5", "--model.size", "96", "--model.width_mult", "0.5"],
                *["--model.lr", "0.02", "--model.warmup_epochs", "1"],
                *["--trainer.max_epochs", str(self.length)],
            ]
            if self.ema:
                args += ["--model.ema_decay", "0.9"]
        else:
            args += [
                *["--data.crop_size", "[64, 128]", "--data.val_batch_size", "2"],
                *["--model.width_mult", "0.5", "--trainer.max_steps", str(self.length)],
            ]
        every = "null" if self.val_every is None else str(self.val_every)
        args += ["--trainer.check_val_every_n_epoch", every]
        args += ["--trainer.val_check_interval", str(self.val_interval or 1.0)]
        args += ["--trainer.accumulate_grad_batches", str(self.accumulate)]
        if self.limit is not None:
            args += ["--trainer.limit_train_batches", str(self.limit)]
        if self.clip is not None:
            args += ["--trainer.gradient_clip_val", str(self.clip)]
        return args


def _first_validation_step(c: Combo) -> int:
    """The optimiser step at the end of the batch after which validation first runs."""
    bpe, spe = c.batches_per_epoch, c.steps_per_epoch
    if c.val_every is None:  # every val_interval batches, counted over epochs
        batch = int(c.val_interval or bpe)
        epoch, within = divmod(batch, bpe)
        if within == 0:
            return epoch * spe
        return epoch * spe + within // c.accumulate
    first_epoch = c.val_every - 1
    if c.val_interval is None:
        return (first_epoch + 1) * spe
    every = int(bpe * c.val_interval) if isinstance(c.val_interval, float) else c.val_interval
    every = max(1, every)
    if every >= bpe:
        return (first_epoch + 1) * spe
    return first_epoch * spe + every // c.accumulate


def draw_combo(rng: random.Random, task: str | None = None) -> Combo:
    """One random combination whose run is long enough to be killed at its kill point."""
    while True:
        task_ = task or rng.choice(("detection", "segmentation"))
        batch = rng.choice((2, 3, 4)) if task_ == "detection" else rng.choice((2, 3))
        images = rng.choice([n for n in range(2 * batch + 1, 5 * batch) if n % batch])
        full = images // batch
        limit = rng.choice((None, "int", "float"))
        if limit == "int" and full > 1:
            limit = rng.randint(1, full - 1)
        elif limit == "float" and int(full * 0.5) >= 1:
            limit = rng.choice((0.5, 0.75))
        else:
            limit = None
        accumulate = rng.choice((1, 1, 2))
        val_every = rng.choice((1, 2) if task_ == "detection" else (None, 1, 2))
        probe = Combo(task_, images, batch, limit, None, None, 1, None, False, 0, 0, "", 0, 1)
        bpe = probe.batches_per_epoch
        if val_every is None:
            val_interval: int | float | None = rng.randint(2, 2 * bpe + 1)
        else:
            val_interval = rng.choice((None, 0.5, "int"))
            if val_interval == "int":
                val_interval = rng.randint(1, bpe)
            elif val_interval == 0.5 and int(bpe * 0.5) < 1:
                val_interval = None
        spe = math.ceil(bpe / accumulate)
        length = rng.choice((2, 3)) if task_ == "detection" else rng.randint(2 * spe + 1, 3 * spe)
        if task_ == "detection" and val_every == 2 and length < 2:
            length = 2
        combo = Combo(
            task=task_,
            images=images,
            batch=batch,
            limit=limit,
            val_interval=val_interval,
            val_every=val_every,
            accumulate=accumulate,
            clip=rng.choice((None, 1.0)),
            ema=task_ == "detection" and rng.random() < 0.5,
            workers=rng.randint(0, 2),
            every_n=rng.choice((0, 1, 2, 3)),
            kill="",
            kill_step=0,
            length=length,
        )
        total = combo.total_steps
        if total < 4 or total > 16:
            continue
        kill = rng.choice(KILLS)
        if kill == "start":
            step = 0
        elif kill == "epoch_end":
            step = rng.randint(1, max(1, total // spe - 1)) * spe
        elif kill == "mid_epoch":
            mids = [s for s in range(1, total - 1) if s % spe]
            if not mids:
                continue
            step = rng.choice(mids)
        else:
            step = _first_validation_step(combo)
        if step >= total - 1:
            continue  # the run could end before the kill lands
        return Combo(**{**asdict(combo), "kill": kill, "kill_step": step})


def draw_combos(n: int, seed: int) -> list[Combo]:
    """``n`` combinations, the same for the same seed (tasks alternate)."""
    rng = random.Random(seed)
    tasks = ("detection", "segmentation")
    return [draw_combo(rng, tasks[(i + seed) % 2]) for i in range(n)]


def make_data(c: Combo, folder: Path) -> Path:
    if c.task == "detection":
        return generate_shapes_coco(
            folder / "coco", num_train=c.images, num_val=4, image_size=(120, 96), seed=3
        )
    return generate_street_scenes(
        folder / "cityscapes", cities=("aachen",), per_city=c.images, size=(64, 128)
    )


@dataclass
class Outcome:
    """What one combination gave."""

    combo: Combo
    resumed_from: int | None  # step of the last.ckpt resumed (None: a new run started)
    final_step: int
    expected_step: int  # the uninterrupted run's
    equal: bool
    max_weight_diff: float
    folders: list[str]  # the run folders of the killed-and-resumed run
    missing_validations: list[int]  # steps validated by the uninterrupted run only
    seconds: float
    index: int = 0  # the combination's place in the draw


def run_combo(c: Combo, folder: Path, timeout: float = 300, index: int = 0) -> Outcome:
    """Uninterrupted run, then the same run killed at ``c``'s kill point and resumed."""
    start = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    data = make_data(c, folder)
    straight, broken = folder / "straight", folder / "broken"
    straight.mkdir()
    broken.mkdir()
    args = c.args(data, folder)
    name = Path(CONFIGS[c.task]).stem
    run(args, straight, timeout=timeout)
    logs = broken / "logs" / name

    def kill_when(step: int | None, output: str) -> bool:
        if c.kill_step == 0:
            return STARTED in output
        return step is not None and step >= c.kill_step

    resumed_from = run_and_kill(args, broken, logs, kill_when, timeout=timeout)
    run(args, broken, "--ckpt_path", "last", timeout=timeout)
    last = find_last_checkpoint(logs)
    assert last is not None
    result = compare_runs(last, straight / "logs" / name / "version_0/checkpoints/last.ckpt")
    validated = set(validation_steps(last.parents[1] / "metrics.csv"))
    expected = validation_steps(straight / "logs" / name / "version_0/metrics.csv")
    return Outcome(
        combo=c,
        resumed_from=resumed_from,
        final_step=result.step_b,
        expected_step=result.step_a,
        equal=result.equal,
        max_weight_diff=result.max_weight_diff,
        folders=sorted(p.name for p in logs.iterdir()),
        missing_validations=[step for step in expected if step not in validated],
        seconds=time.monotonic() - start,
        index=index,
    )


def table(outcomes: list[Outcome]) -> str:
    """One row per combination: options, kill point, resumed-from and final step, equal."""
    rows = [
        ("#", "options", "kill", "resumed from", "final step", "equal", "max diff", "val rows", "s")
    ]
    for o in outcomes:
        c = o.combo
        kill = c.kill if c.kill == "start" else f"{c.kill} (>= step {c.kill_step})"
        where = "new run" if o.resumed_from is None else str(o.resumed_from)
        if o.resumed_from is not None:
            where += " (epoch end)" if o.resumed_from % c.steps_per_epoch == 0 else " (mid-epoch)"
        rows.append((
            str(o.index), c.options(), kill, where, f"{o.final_step}/{o.expected_step}",
            "yes" if o.equal else "NO", f"{o.max_weight_diff:g}",
            f"missing {o.missing_validations}" if o.missing_validations else "same",
            f"{o.seconds:.0f}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
