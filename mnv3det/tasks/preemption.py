"""SIGTERM / SIGUSR1: write ``last.ckpt`` at the next step boundary, exit with the resume line.

Schedulers announce the end of a job with a signal: SIGTERM (SLURM preemption or time limit,
Kubernetes, ``kill``), and SLURM's ``--signal=USR1@SECONDS`` some time before the limit. Lightning
already reacts to SIGTERM: its signal handler sets ``trainer.received_sigterm`` and the loops
raise ``SIGTERMException`` (a ``SystemExit``) at their next check. Left alone that loses the
steps since the last checkpoint, exits with status 0 (the job looks finished), and SIGUSR1
outside SLURM kills the process (the signal's default action).

:class:`Preemption` builds on that mechanism:

* its signal connector (:class:`PreemptionSignalConnector`, Lightning's ``_SignalConnector``
  with another SIGTERM/SIGUSR1 handler) records the signal; a thread reading the interpreter's
  wakeup fd forwards it to the DDP processes Lightning started (as Lightning does), says so and
  starts the grace timer, also while the main thread is blocked. Lightning's own handler also
  broadcasts from rank 0 inside the signal handler, a collective that can interleave with the
  one the rank is in; here the ranks agree at a fixed point instead;
* at the next training step boundary (``on_train_batch_end``, where ``last.ckpt`` is taken
  and resumes exactly; under DDP all ranks agree on the step through one all-reduce per step),
  it has :class:`~mnv3det.tasks.checkpoints.LastCheckpoint` take the state and sets Lightning's
  ``received_sigterm``, so Lightning's loops raise ``SIGTERMException`` right after;
* while validating (or in the sanity check, or in ``validate``/``test``) Lightning's evaluation
  loop stops at its next batch; ``last.ckpt`` then holds the newest state taken before;
* on the exception it writes ``last.ckpt``, prints one line (step, file, resume command) and
  sets the exit status to ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1), the shell's
  status of a process ended by that signal: the job did not finish, so a scheduler (SLURM's
  ``afterok``, a Kubernetes Job, ``torchrun``) does not take it as done;
* a run that cannot reach a step boundary (stuck in a data loader or a collective) ends hard
  on a repeated signal (one second or more after the first: a signal to the whole process
  group reaches the DDP ranks twice) or when the grace period runs out (same status, no
  checkpoint);
* DataLoader workers forked during the run block these signals: a signal to every process of
  the job (SLURM's ``scancel`` and time limit) would otherwise kill them, and the run would
  fail on the lost worker instead of stopping.

Under SLURM with Lightning's auto-requeue (``SLURMEnvironment``, on by default when the job runs
under ``srun``/``sbatch``) the requeue signal keeps Lightning's handler: it saves
``hpc_ckpt_N.ckpt`` and calls ``scontrol requeue``; the requeued job continues in the same run
folder (:mod:`mnv3det.cli.runs`). SIGTERM is handled as above there too.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnv3det.tasks.checkpoints import LastCheckpoint

__all__ = ["Preemption", "PreemptionSignalConnector", "resume_command"]

DEFAULT_GRACE_S = 60.0
REPEAT_AFTER_S = 1.0
"""A repeated signal within this many seconds of the first is the same request."""


def _say(text: str) -> None:
    # os.write, not print: a Python signal handler may run while the main thread is inside a
    # print to the same stream, and the buffered writer refuses re-entrant calls
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode())


def resume_command(argv: list[str] | None = None) -> str | None:
    """The ``mnv3det fit ... --ckpt_path last`` line that resumes this run (``None``: not the CLI).

    Args:
        argv: the process arguments (default ``sys.argv``); the run is the CLI's when its first
            argument is ``fit``.
    """
    args = list(sys.argv if argv is None else argv)[1:]
    if not args or args[0] != "fit":
        return None
    kept: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg == "--ckpt_path":
            skip_next = True
            continue
        if arg.startswith("--ckpt_path="):
            continue
        kept.append(arg)
    return shlex.join(["mnv3det", *kept, "--ckpt_path", "last"])


class PreemptionSignalConnector(_SignalConnector):
    """Lightning's signal connector whose SIGTERM/SIGUSR1 handler asks for a stop at the next
    step boundary (see the module doc) instead of setting ``received_sigterm`` at once.

    Args:
        trainer: the trainer.
        grace_s: seconds after the first signal before the process ends hard.
    """

    def __init__(self, trainer: L.Trainer, grace_s: float = DEFAULT_GRACE_S) -> None:
        super().__init__(trainer)
        self.grace_s = grace_s
        self.stop_signal: int | None = None
        """The first stop signal received (``None``: none)."""
        self._stop_signals: tuple[int, ...] = ()
        self._first_at: float | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._ended = False
        """The trainer's run is over: no grace timer may start any more (the watcher thread can
        count a signal after the main thread has already stopped and torn down)."""
        self._watcher: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self.stop_signal = None
        self._first_at = None
        self._ended = False
        self._original_handlers = self._get_current_signal_handlers()
        if not hasattr(signal, "SIGUSR1"):  # Windows: Lightning registers nothing there either
            return
        if threading.current_thread() is not threading.main_thread():
            return  # as Lightning: signal handlers can only be set from the main thread
        environment = self.trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        stop_signals = [signal.SIGTERM]
        if slurm_requeue:
            # Lightning's SLURM auto-requeue: hpc_ckpt_N.ckpt and `scontrol requeue`
            requeue = environment.requeue_signal or signal.SIGUSR1
            if not self._has_already_handler(requeue):
                self._register_signal(requeue, _HandlersCompose([self._slurm_sigusr_handler_fn]))
        else:
            stop_signals.append(signal.SIGUSR1)
        self._stop_signals = tuple(int(s) for s in stop_signals)
        _leave_signals_to_this_process(self._stop_signals)
        for signum in stop_signals:
            handlers: list[Any] = [self._stop_handler]
            if signum == signal.SIGTERM and self._has_already_handler(signum):
                handlers.append(signal.getsignal(signum))  # as Lightning: keep a user's handler
            self._register_signal(signum, _HandlersCompose(handlers))
        self._start_watcher()

    def _start_watcher(self) -> None:
        """Count the signals in a thread, from the interpreter's wakeup fd.

        A Python signal handler runs in the main thread between bytecodes, so a main thread
        blocked in a data loader or a collective never runs it; the interpreter's C-level
        handler still writes the signal number to the wakeup fd at once, and this thread
        (which runs while the main thread waits without the GIL) starts the grace timer and
        ends the process on a repeated signal. Left out where something else (an asyncio
        loop) owns the wakeup fd: the Python handler does it then.
        """
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            old = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:
            old = None
        if old is None or old != -1:
            if old is not None:
                signal.set_wakeup_fd(old)
            os.close(read_fd)
            os.close(write_fd)
            return
        self._pipe = (read_fd, write_fd)
        self._watcher = threading.Thread(
            target=self._watch, args=(read_fd,), name="mnv3det-signals", daemon=True
        )
        self._watcher.start()

    def _watch(self, read_fd: int) -> None:
        try:
            while data := os.read(read_fd, 64):
                for signum in data:
                    if signum in self._stop_signals:
                        self._count(signum)
        finally:
            os.close(read_fd)

    def _stop_handler(self, signum: int, frame: FrameType | None) -> None:
        # main thread: the flag the step boundary reads (the watcher thread counts)
        if self.stop_signal is None:
            self.stop_signal = signum
        trainer = self.trainer
        if trainer.state.fn != "fit" or trainer.sanity_checking or trainer.validating:
            # Lightning's evaluation loops stop at their next batch; in a fit, last.ckpt keeps
            # the newest state taken before this validation (predict never looks: the grace
            # period ends it)
            self.received_sigterm = True
        if self._watcher is None:
            self._count(signum)

    def _count(self, signum: int) -> None:
        """First signal: forward it, say so, start the grace timer; a repeat: end now."""
        name = signal.Signals(signum).name
        now = time.monotonic()
        with self._lock:
            if self._ended:
                return
            first = self._first_at is None
            if first:
                self._first_at = now
                if self.stop_signal is None:
                    self.stop_signal = signum
            elif now - self._first_at < REPEAT_AFTER_S:
                # the same request: a signal to the process group also reaches the DDP
                # processes that Lightning forwards it to
                return
        if not first:
            self._hard_exit(signum, f"{name} again")
            return
        launcher = self.trainer.strategy.launcher
        if launcher is not None:
            launcher.kill(signum)  # the DDP processes Lightning started (as Lightning does)
        if self.trainer.is_global_zero:
            grace = f", or {self.grace_s:g} s without a step boundary" if self.grace_s > 0 else ""
            _say(
                f"[run] {name} received: stopping at the next step boundary with last.ckpt "
                f"(send it again{grace}: stop at once)"
            )
        if self.grace_s > 0:
            with self._lock:
                if self._ended:
                    return
                self._timer = threading.Timer(self.grace_s, self._grace_over, args=(signum,))
                self._timer.daemon = True
                self._timer.start()

    def _grace_over(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.received_sigterm and self.trainer.state.fn == "fit":
            # the stop itself hangs (after last.ckpt, e.g. in a DDP teardown)
            self._hard_exit(signum, f"the stop did not end within {self.grace_s:g} s of {name}")
        else:
            self._hard_exit(signum, f"no step boundary within {self.grace_s:g} s of {name}")

    def _hard_exit(self, signum: int, why: str) -> None:
        _say(
            f"[run] {why}: stopping now without writing a checkpoint (last.ckpt, if any, "
            "holds the newest state written before)"
        )
        launcher = self.trainer.strategy.launcher
        if launcher is not None:
            with contextlib.suppress(Exception):  # the process ends next anyway
                launcher.kill(signal.SIGKILL)
        os._exit(128 + int(signum))

    def cancel_grace(self) -> None:
        """Stop the grace timer and start no other (the run reached its stop)."""
        with self._lock:
            self._ended = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def teardown(self) -> None:
        super().teardown()
        # the trainer is done (stopped, or it reached its last step after the signal); the timer
        # ran until here, so a stop that hangs in its teardown (a collective) still ends
        self.cancel_grace()
        _leave_signals_to_this_process(())
        if self._pipe is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
            _, write_fd = self._pipe
            self._pipe = None
            os.close(write_fd)  # the watcher reads the end of the pipe, closes it and ends
            self._watcher = None


_blocked_in_children: list[tuple[int, ...]] = []


def _leave_signals_to_this_process(signals: tuple[int, ...]) -> None:
    """Block ``signals`` in the processes forked from now on (DataLoader workers).

    A scheduler often signals every process of the job (SLURM's ``scancel`` and time limit, a
    process-group kill): a DataLoader worker would die of SIGTERM (torch's worker handler) and
    the main process would fail on the lost worker instead of stopping at the step boundary.
    Blocked signals stay pending in the worker, which the main process shuts down as usual. A
    forked worker also forgets the wakeup fd, whose pipe it inherits.
    """
    if not _blocked_in_children:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _blocked_in_children.append(())
    _blocked_in_children[0] = signals


def _after_fork_in_child() -> None:
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    if _blocked_in_children and _blocked_in_children[0]:
        signal.pthread_sigmask(signal.SIG_BLOCK, _blocked_in_children[0])


class Preemption(L.Callback):
    """Stop a run on SIGTERM/SIGUSR1 at the next step boundary with ``last.ckpt`` written.

    The ``mnv3det`` command installs it in every trainer (:mod:`mnv3det.tasks.guards`); put it
    in ``trainer.callbacks`` to change the grace period. See the module doc for the design.

    Args:
        grace_s: seconds after the first signal before the process ends without a checkpoint
            (a run stuck in a data loader or a collective); 0 waits forever (a second signal
            still ends it).
    """

    def __init__(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        if grace_s < 0:
            raise ValueError(f"Preemption: grace_s must be >= 0, got {grace_s}")
        self.grace_s = float(grace_s)
        self._connector: PreemptionSignalConnector | None = None

    def install(self, trainer: L.Trainer) -> None:
        """Replace the trainer's signal connector (before ``fit``; done by the guards)."""
        self._connector = PreemptionSignalConnector(trainer, self.grace_s)
        trainer._signal_connector = self._connector

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(trainer._signal_connector, PreemptionSignalConnector):
            self.install(trainer)
        self._connector = trainer._signal_connector  # type: ignore[assignment]

    def _last_checkpoint(self, trainer: L.Trainer) -> LastCheckpoint | None:
        return next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        connector = self._connector
        if connector is None or connector.received_sigterm:
            return
        accumulate = max(1, trainer.accumulate_grad_batches)
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if (batch_idx + 1) % accumulate and not last_batch:
            return  # mid-accumulation: a state without its pending gradients does not resume
        asked = connector.stop_signal is not None
        if trainer.world_size > 1:
            # every rank stops at the same step (the checkpoint is taken on all of them); one
            # tiny all-reduce per optimiser step, as Lightning's own per-batch SIGTERM broadcast
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
            if asked and connector.stop_signal is None:
                connector.stop_signal = signal.SIGTERM  # asked on another rank
        if not asked:
            return
        last = self._last_checkpoint(trainer)
        if last is not None:
            last.save_now(trainer)  # taken here, written in on_exception below
        connector.received_sigterm = True  # Lightning's loops raise SIGTERMException next

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        connector = self._connector
        if not isinstance(exception, SIGTERMException) or connector is None:
            return
        signum = connector.stop_signal or signal.SIGTERM
        name = signal.Signals(signum).name
        last = self._last_checkpoint(trainer)
        path = last.flush(trainer) if last is not None else None  # before the line saying so
        exception.code = 128 + int(signum)  # SystemExit's status (Lightning's is 0)
        if not trainer.is_global_zero:
            return
        if trainer.state.fn != "fit":
            stage = getattr(trainer.state.fn, "value", trainer.state.fn)  # "validate", ...
            print(f"[run] stopped by {name} in {stage}", file=sys.stderr, flush=True)
            return
        where = f"at step {trainer.global_step}"
        if path is not None and last is not None:
            saved = f"last.ckpt (step {last.saved_step}) written to {path}"
        elif last is not None and last.last_model_path and os.path.isfile(last.last_model_path):
            path = last.last_model_path  # a resumed run stopped before it saved anything
            saved = f"the last.ckpt written before is {path}"
        elif last is None:
            saved = (
                "no last.ckpt written (add mnv3det.tasks.checkpoints.LastCheckpoint to "
                "trainer.callbacks to resume from the stop)"
            )
        else:
            saved = "no last.ckpt written yet: the run restarts from the beginning"
        command = resume_command()
        how = f"; resume with: {command}" if command and path else ""
        if not command and path:
            how = f"; resume with trainer.fit(..., ckpt_path={str(path)!r})"
        print(f"[run] stopped by {name} {where}: {saved}{how}", file=sys.stderr, flush=True)
