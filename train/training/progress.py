"""A training run's live progress bar: on a terminal, from the first optimizer step, step / total steps, the time
left (ETA), samples/s and the latest loss, in one line that redraws. Elsewhere (SLURM logs, CI, pipes) there is no
bar: tracking.log prints a plain `step N/TOTAL: ...` line per logging step instead."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


class TrainingBar:
    """The bar of one process (the local main one; the others and non-terminals get a disabled tqdm)."""

    def __init__(self, accelerator: Any, total_steps: int, done_steps: int, samples_per_step: int) -> None:
        shown = accelerator.is_local_main_process and sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE")
        self.bar = tqdm(
            total=total_steps,
            initial=done_steps,  # a resumed run: its rate and ETA count only the steps run here
            disable=not shown,
            desc="training",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        # Until the first logging step measures it: the recipe's samples per optimizer step (all ranks).
        self.samples_per_step = float(samples_per_step)
        self.loss: float | None = None
        self.steps_before = done_steps

    def step(self) -> None:
        """One optimizer step done: the bar moves (tqdm redraws at most 10 times a second)."""
        self.bar.update(1)
        # Drawn at once after the first step, whose rate tqdm now knows; later with tqdm's next redraw.
        self.describe(refresh=self.bar.n - self.steps_before == 1)

    def show(self, metrics: dict[str, float]) -> None:
        """After step(), at a logging step: the latest loss, and the samples per step this process has measured
        (packing, short epoch tails and skipped samples make it differ from the recipe's)."""
        self.loss = metrics.get("train/loss", self.loss)
        steps_run = self.bar.n - self.steps_before
        if steps_run > 0 and metrics.get("train/samples_per_s") and metrics.get("train/elapsed_s"):
            self.samples_per_step = metrics["train/samples_per_s"] * metrics["train/elapsed_s"] / steps_run
        self.describe(refresh=False)

    def describe(self, refresh: bool) -> None:
        """samples/s from the step rate tqdm measures (smoothed), and the latest loss, after the bar."""
        if self.bar.disable:
            return
        rate = self.bar.format_dict.get("rate") or 0.0
        postfix = f"{rate * self.samples_per_step:.3g} samples/s"
        if self.loss is not None:
            postfix += f", loss {self.loss:.4f}"
        self.bar.set_postfix_str(postfix, refresh=refresh)

    def close(self) -> None:
        self.bar.close()
