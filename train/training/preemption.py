"""Preemption: SIGTERM (clusters, schedulers) or SIGINT (Ctrl-C) asks the loop to finish its step, checkpoint and
exit with 128+signal; relaunching the same command resumes. Every rank stops at the same step."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class TrainingStopped(Exception):
    """SIGTERM/SIGINT arrived: the run saved a checkpoint and stopped; relaunching resumes it."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}; "
            "relaunch the same command to resume"
        )


class StopInterrupt(BaseException):
    """Raised by the signal handler inside `StopRequest.interrupting()`: what ran there (a slow decode, a forward
    pass of evaluation) is abandoned at once. A BaseException, so that no `except Exception` on the way holds it."""


class StopRequest:
    """SIGTERM (preemption, scheduler) or SIGINT (Ctrl-C) asks the loop to checkpoint after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._interrupt = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        if self._interrupt:
            self._interrupt = False
            raise StopInterrupt

    @contextmanager
    def interrupting(self, accelerator: Any) -> Iterator[None]:
        """Within it, a signal interrupts the work in progress (StopInterrupt) instead of waiting for the next check:
        evaluation holds no training state, and one slow batch (a decode near its time limit) can outlast a
        preemption's grace period. Single-process runs only: in a multi-process run one rank leaving a collective
        alone would hang the others, so there the ranks agree at batch boundaries (`requested`)."""
        if accelerator.num_processes > 1:
            yield
            return
        if self.signum:
            raise StopInterrupt
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, accelerator: Any, agree: bool = True) -> int | None:
        """The signal, agreed by all ranks (a scheduler may signal only some of them). Agreeing is an all-reduce
        whose result the host reads (a sync), so the training loop of a multi-process run asks only where it reads
        anyway (`agree`: its read points); a single process just reads its flag."""
        signum = self.signum or 0
        if accelerator.num_processes > 1 and not agree:
            return None
        if accelerator.num_processes > 1:
            signum = int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), "max").item())
        return signum or None


class WorkerSignals:
    """DataLoader worker_init_fn that leaves preemption to the main process.

    Clusters (SLURM, `timeout`) send SIGTERM to every process of a job, DataLoader workers included; a worker killed
    by it makes the main process fail at once ("DataLoader worker ... is killed by signal: Terminated") instead of
    finishing its step and checkpointing. So workers ignore SIGTERM and SIGINT while the main process runs. When the
    main process exits, multiprocessing terminates its workers with SIGTERM: a flag shared with them (set by an exit
    hook that runs before multiprocessing's) makes that SIGTERM end them as usual.
    """

    def __init__(self) -> None:
        self.main_exiting = multiprocessing.Value("b", 0, lock=False)
        atexit.register(self._main_exits)  # registered after multiprocessing's own hook, so it runs before it

    def _main_exits(self) -> None:
        self.main_exiting.value = 1

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.main_exiting.value:  # the main process is shutting its workers down: die as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
