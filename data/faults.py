"""Fault injection for crash-safety tests: the real process meets a real fault at a chosen point.

VIDTUNE_FAULT holds comma-separated faults:
  kill@STEP.MICRO    SIGKILL this process just before micro-batch MICRO of optimizer step STEP+1
  term@STEP.MICRO    SIGTERM (int@: SIGINT) to this process at the same point: a preemption, handled
  killsave@STEP      SIGKILL this process in the middle of writing the checkpoint of step STEP
  nan@STEP.N         make the loss NaN for N windows (default 1) once STEP optimizer steps are done
  hang@TEXT          decoding a file whose path contains TEXT never returns (until the decode time limit)
Unset (always, outside tests) each check costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "VIDTUNE_FAULT"


def _faults() -> list[tuple[str, str]]:
    spec = os.environ.get(ENV)
    if not spec:
        return []
    return [tuple(item.split("@", 1)) for item in spec.split(",") if "@" in item]  # type: ignore[misc]


def before_micro_batch(steps_done: int, micro_batch: int) -> None:
    for action, where in _faults():
        step, _, micro = where.partition(".")
        signals = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
        if action in signals and steps_done == int(step) and micro_batch == int(micro or 0):
            os.kill(os.getpid(), signals[action])


def during_checkpoint_save(step: int) -> None:
    if ("killsave", str(step)) in _faults():
        os.kill(os.getpid(), signal.SIGKILL)


_fired: dict[str, int] = {}


def nan_loss(steps_done: int) -> bool:
    """nan@STEP.N: the loss is NaN for N windows (default 1) while STEP optimizer steps are done."""
    for action, where in _faults():
        step, _, times = where.partition(".")
        if action == "nan" and steps_done == int(step) and _fired.get(where, 0) < int(times or 1):
            _fired[where] = _fired.get(where, 0) + 1
            return True
    return False


def before_decode(path: str) -> None:
    for action, where in _faults():
        if action == "hang" and where in path:
            time.sleep(10**6)
