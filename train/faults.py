"""Fault injection for tests of crash safety: the real process gets a real signal at a chosen point.

VIDTUNE_FAULT="kill@STEP.MICRO" sends SIGKILL to this process just before micro-batch MICRO of optimizer step STEP+1
(STEP optimizer steps done), so a test can cut a run mid-epoch or mid-accumulation, deterministically.
Unset (always, outside tests) it costs one dictionary lookup per micro-batch.
"""

from __future__ import annotations

import os
import signal

ENV = "VIDTUNE_FAULT"


def before_micro_batch(steps_done: int, micro_batch: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, _, where = spec.partition("@")
    step, _, micro = where.partition(".")
    if action == "kill" and steps_done == int(step) and micro_batch == int(micro or 0):
        os.kill(os.getpid(), signal.SIGKILL)
