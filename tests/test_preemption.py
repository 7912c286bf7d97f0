"""SIGTERM / SIGUSR1 to a real ``mnv3det fit``: ``last.ckpt`` written at the next step boundary,
one line with the resume command, exit status 128 + signal; the printed command resumes. A run
stuck where no step boundary comes still ends (a repeated signal, or the grace period)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time

import lightning as L
import pytest
import torch
from stop_runs import (
    ENV,
    STEPS_PER_EPOCH,
    TIMEOUT_S,
    finish,
    fit_args,
    last_step,
    load,
    logs_of,
    make_coco,
    run_fit,
    run_lines,
    start_fit,
    wait_until,
)

from mnv3det.tasks.checkpoints import LastCheckpoint
from mnv3det.tasks.guards import install_run_guards

STOPPED = re.compile(
    r"^\[run\] stopped by (SIG\w+) at step (\d+): last\.ckpt \(step (\d+)\) written to (\S+); "
    r"resume with: (.*)$"
)


def stop_with(signum: int, tmp_path) -> tuple[int, re.Match, list[str]]:
    """Start a fit, send ``signum`` once the first epoch's ``last.ckpt`` is there, wait."""
    root = make_coco(tmp_path / "coco")
    proc = start_fit(fit_args(root), tmp_path)
    wait_until(proc, lambda: last_step(tmp_path) >= STEPS_PER_EPOCH, "the first last.ckpt")
    proc.send_signal(signum)
    code, out = finish(proc)
    lines = run_lines(out)
    stopped = [m for m in map(STOPPED.match, lines) if m]
    assert len(stopped) == 1, out[-3000:]
    return code, stopped[0], lines


@pytest.mark.slow
def test_sigterm_mid_epoch_writes_last_ckpt_and_the_printed_command_resumes(tmp_path) -> None:
    code, stopped, lines = stop_with(signal.SIGTERM, tmp_path)
    print("\n".join(lines))
    assert code == 128 + signal.SIGTERM
    name, step, saved_step, path, command = stopped.groups()
    assert name == "SIGTERM" and step == saved_step
    # stopped at the first step boundary after the signal, in the second epoch or later
    assert int(step) > STEPS_PER_EPOCH
    assert load(tmp_path / path)["global_step"] == int(step)
    print(f"stopped at step {step} ({'mid-epoch' if int(step) % STEPS_PER_EPOCH else 'epoch end'})")
    argv = shlex.split(command)
    assert argv[:2] == ["mnv3det", "fit"] and argv[-2:] == ["--ckpt_path", "last"]
    code, out = run_fit(argv[2:], tmp_path)
    assert code == 0, out[-3000:]
    assert "[run] --ckpt_path last: continuing from" in out
    assert last_step(tmp_path) == 4 * STEPS_PER_EPOCH
    assert sorted(p.name for p in logs_of(tmp_path).iterdir()) == ["version_0"]
    # the same weights as a run that was never stopped (CPU, fixed seed)
    straight = tmp_path / "straight"
    straight.mkdir()
    code, out = run_fit(argv[2:-2], straight)
    assert code == 0, out[-3000:]
    resumed = load(logs_of(tmp_path) / "version_0/checkpoints/last.ckpt")["state_dict"]
    uninterrupted = load(logs_of(straight) / "version_0/checkpoints/last.ckpt")["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


@pytest.mark.slow
def test_sigusr1_without_slurm_stops_the_same_way(tmp_path) -> None:
    code, stopped, lines = stop_with(signal.SIGUSR1, tmp_path)
    print("\n".join(lines))
    assert code == 128 + signal.SIGUSR1
    assert stopped.group(1) == "SIGUSR1"
    assert load(tmp_path / stopped.group(4))["global_step"] == int(stopped.group(2))


@pytest.mark.slow
def test_sigterm_to_every_process_under_ddp_stops_all_ranks_at_one_step(tmp_path) -> None:
    """As SLURM's scancel or time limit: the signal reaches both DDP ranks and every DataLoader
    worker at once; the workers must not die of it, the ranks agree on the step."""
    root = make_coco(tmp_path / "coco")
    args = fit_args(root, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    proc = start_fit(args, tmp_path, new_session=True)
    steps_per_epoch = STEPS_PER_EPOCH // 2  # each rank takes half of every epoch
    wait_until(proc, lambda: last_step(tmp_path) >= steps_per_epoch, "the first last.ckpt")
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finish(proc)
    lines = run_lines(out)
    print("\n".join(lines))
    assert code == 128 + signal.SIGTERM, out[-3000:]
    stopped = [m for m in map(STOPPED.match, lines) if m]
    assert len(stopped) == 1 and "DataLoader worker" not in out
    assert load(tmp_path / stopped[0].group(4))["global_step"] == int(stopped[0].group(2))
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:  # rank 1 and the workers end too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("processes of the run were left behind")


# A training step blocked in a C call that never returns and never runs Python code (as one
# stuck in a collective): Python's signal handlers cannot run; the watcher thread must act.
STUCK = textwrap.dedent(
    """
    import ctypes, pathlib, sys
    import lightning as L, torch
    from mnv3det.tasks.guards import install_run_guards
    from mnv3det.tasks.preemption import Preemption

    class Stuck(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
        def training_step(self, batch, batch_idx):
            libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)  # zeros: unlocked
            libc.pthread_mutex_lock(mutex)
            pathlib.Path(sys.argv[2]).touch()
            libc.pthread_mutex_lock(mutex)  # again: blocks for ever, signals do not end it
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=2)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[Preemption(grace_s=float(sys.argv[1]))])
    install_run_guards(trainer)
    trainer.fit(Stuck())
    """
)


def start_stuck(grace_s: float, tmp_path) -> subprocess.Popen:
    stuck = tmp_path / "stuck"
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(grace_s), str(stuck)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(proc, stuck.exists, "the stuck training step")
    return proc


def test_repeated_sigterm_ends_a_stuck_run(tmp_path) -> None:
    proc = start_stuck(0, tmp_path)  # no grace period: only the repeated signal ends it
    proc.send_signal(signal.SIGTERM)
    try:  # a repeat counts REPEAT_AFTER_S after the first
        proc.wait(timeout=1.5)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "[run] SIGTERM received: stopping at the next step boundary" in out
    assert "[run] SIGTERM again: stopping now without writing a checkpoint" in out


def test_grace_period_ends_a_stuck_run(tmp_path) -> None:
    proc = start_stuck(1, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "[run] no step boundary within 1 s of SIGTERM: stopping now" in out


@pytest.fixture
def no_grace_timer_left():
    """A run stopped in this process leaves no grace timer behind: one would end the whole
    process (here pytest) with status 143 a minute later."""
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer)]
        if not [t for t in timers if t.is_alive() and not t.finished.is_set()]:
            return
        time.sleep(0.05)
    raise AssertionError(f"grace timers still running after the run: {timers}")


class Evaluated(L.LightningModule):
    """4 training and 4 validation batches; a SIGTERM to itself at validation batch ``kill_at``
    of validation number ``in_validation`` (0: the sanity check)."""

    def __init__(self, in_validation: int, kill_at: int = 0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.in_validation, self.kill_at, self.validations = in_validation, kill_at, 0
        self.validated: list[int] = []

    def training_step(self, batch, batch_idx):
        return (self.w * batch).square().mean()

    def validation_step(self, batch, batch_idx):
        self.validated.append(batch_idx)
        if self.validations == self.in_validation and batch_idx == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_end(self):
        self.validations += 1

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(8.0).view(8, 1), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(8.0).view(8, 1), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def evaluated_trainer(tmp_path, sanity_steps: int) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="tiny"),
        callbacks=[LastCheckpoint()],
        num_sanity_val_steps=sanity_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return install_run_guards(trainer)


def test_sigterm_during_validation_stops_at_its_next_batch(
    tmp_path, capsys, no_grace_timer_left
) -> None:
    module = Evaluated(in_validation=1)  # the second epoch's validation
    with pytest.raises(SystemExit) as stopped:
        evaluated_trainer(tmp_path, sanity_steps=0).fit(module)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert module.validated == [0, 1, 2, 3, 0]  # the first validation whole, then one batch
    err = capsys.readouterr().err
    path = tmp_path / "tiny/version_0/checkpoints/last.ckpt"
    assert f"[run] stopped by SIGTERM at step 8: last.ckpt (step 8) written to {path}" in err
    assert load(path)["global_step"] == 8  # the end of the second epoch, before its validation


def test_sigterm_in_the_sanity_check_stops_before_any_step(
    tmp_path, capsys, no_grace_timer_left
) -> None:
    with pytest.raises(SystemExit) as stopped:
        evaluated_trainer(tmp_path, sanity_steps=2).fit(Evaluated(in_validation=0))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 0: no last.ckpt written yet" in capsys.readouterr().err


def test_sigterm_in_validate_stops_it(tmp_path, capsys, no_grace_timer_left) -> None:
    with pytest.raises(SystemExit) as stopped:
        evaluated_trainer(tmp_path, sanity_steps=0).validate(Evaluated(in_validation=0))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "[run] stopped by SIGTERM in validate" in capsys.readouterr().err


def test_guards_add_one_preemption_or_use_the_configs() -> None:
    from mnv3det.tasks.divergence import NonFiniteGuard
    from mnv3det.tasks.preemption import Preemption, PreemptionSignalConnector

    for given, grace in (([], 60.0), ([Preemption(grace_s=5)], 5.0)):
        trainer = install_run_guards(L.Trainer(accelerator="cpu", logger=False, callbacks=given))
        install_run_guards(trainer)  # twice: still one of each
        assert sum(isinstance(c, Preemption) for c in trainer.callbacks) == 1
        assert sum(isinstance(c, NonFiniteGuard) for c in trainer.callbacks) == 1
        assert isinstance(trainer._signal_connector, PreemptionSignalConnector)
        assert trainer._signal_connector.grace_s == grace


class Accumulating(Evaluated):
    """A SIGTERM to itself in the first batch of a 2-batch accumulation window."""

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)


def test_sigterm_mid_accumulation_stops_after_the_optimiser_step(
    tmp_path, capsys, no_grace_timer_left
) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        accumulate_grad_batches=2,
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="tiny"),
        callbacks=[LastCheckpoint()],
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(SystemExit):
        install_run_guards(trainer).fit(Accumulating(in_validation=-1))
    checkpoint = load(tmp_path / "tiny/version_0/checkpoints/last.ckpt")
    assert checkpoint["global_step"] == 1  # after batches 0 and 1, one optimiser step
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2
    assert "stopped by SIGTERM at step 1" in capsys.readouterr().err
