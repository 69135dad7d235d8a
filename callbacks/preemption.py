"""Preemption: on SIGTERM, finish the current step, save `last.ckpt`, stop, and exit so the job can be resumed.

The signal handler only sets a flag (installed for the duration of training, the previous handler restored after).
At the next `on_train_batch_end` every rank agrees on it (any rank signalled) and `trainer.save_checkpoint` writes
`<dirpath>/last.ckpt` — the same file ModelCheckpoint(save_last=True) keeps, so `ckpt_path=last` resumes from
it. `Preempted` is raised at the next hook, once Lightning has written that step's metrics to the loggers (the
next batch start, epoch end or train end); `ctt.train` turns it into a log line and exit status `exit_code`.

Why an exception rather than `trainer.should_stop = True`: a stop lets the epoch "finish", and ModelCheckpoint's
`on_train_end` (when it has not saved a last checkpoint yet in this run) then overwrites `last.ckpt` with a state
whose epoch is marked complete — a resume from it would skip the rest of that epoch. The exception ends the run
right after our save, like Lightning's own SIGTERM handling (which saves nothing). Loggers are finalised.

The step in progress when the signal arrives is completed first: the grace period of the scheduler (Kubernetes'
terminationGracePeriodSeconds, SLURM's KillWait or `--signal=TERM@<seconds>`) must cover one training step.
On SLURM, `plugins=slurm` additionally enables Lightning's SIGUSR1 requeue (see conf/plugins/slurm.yaml).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; `ctt.train` exits with `exit_code`."""

    def __init__(self, message: str, checkpoint: Path, exit_code: int):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code


class Preemption(L.Callback):
    def __init__(
        self, dirpath: str, filename: str = "last.ckpt", signals: tuple[str, ...] | list[str] = ("SIGTERM",),
        exit_code: int = 143,
    ):
        self.path = Path(dirpath) / filename
        self.signals = [getattr(signal, name) for name in signals]
        self.exit_code = exit_code  # 143 = 128 + SIGTERM: what a process killed by SIGTERM reports
        self.received: int | None = None  # the signal number, once one arrived
        self._saved_at: int | None = None  # the step whose checkpoint was written; Preempted follows
        self._previous: dict[int, object] = {}

    # --- the handler -------------------------------------------------------------------------------------------

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            log.warning("received %s: saving a checkpoint after the current step, then stopping",
                        signal.Signals(signum).name)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: no preemption handler installed")
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # --- hooks -------------------------------------------------------------------------------------------------

    def on_train_start(self, trainer, module) -> None:
        self.received, self._saved_at = None, None
        self._install()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._saved_at is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        trainer.save_checkpoint(self.path)  # every rank calls it (sharded strategies need that); rank 0 writes
        self._saved_at = trainer.global_step

    def _stop_if_saved(self) -> None:
        if self._saved_at is None:
            return
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        raise Preempted(
            f"preempted by {name} at step {self._saved_at}: checkpoint saved to {self.path}", self.path, self.exit_code
        )

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._stop_if_saved()

    def on_train_epoch_end(self, trainer, module) -> None:
        self._stop_if_saved()  # before ModelCheckpoint's epoch-end save (callbacks run before checkpointing ones)

    def on_train_end(self, trainer, module) -> None:
        self._restore()
        self._stop_if_saved()

    def on_exception(self, trainer, module, exception) -> None:
        self._restore()
