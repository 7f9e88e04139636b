"""Preemption: SIGTERM (clusters, schedulers) or SIGINT (Ctrl-C) asks the loop to finish its step, checkpoint and
exit with 128+signal; relaunching the same command resumes. Every rank stops at the same step."""

from __future__ import annotations

import signal
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


class StopRequest:
    """SIGTERM (preemption, scheduler) or SIGINT (Ctrl-C) asks the loop to checkpoint after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, accelerator: Any) -> int | None:
        """The signal, agreed by all ranks (a scheduler may signal only some of them)."""
        signum = self.signum or 0
        if accelerator.num_processes > 1:
            signum = int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), "max").item())
        return signum or None
