"""What the loop watches every step: samples that failed to load (against the bad-sample budget) and non-finite
losses (skipped steps). Every decision that must be the same on every rank is all-reduced first."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import torch

from vidtune.data.conversation import DataError
from vidtune.data.quality import BadSampleConfig, kind_of

BAD_SAMPLES_FILE = "bad_samples.jsonl"


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite losses, ...); the last checkpoint is intact."""


def agree(accelerator: Any, flag: bool) -> bool:
    """True on every rank when it is true on any (one all-reduce; free in single-process runs)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max").item() > 0)


class BadSampleMonitor:
    """Samples replaced at training time (they failed to load), counted against the bad-sample budget over a
    sliding window of samples and over the whole run, summed over ranks so every rank stops together. Every failed
    file is named on the console and in OUTPUT/bad_samples.jsonl. (Too many failures in a row are caught where they
    happen: the dataset gives up after max_bad_in_a_row consecutive replacements.)"""

    def __init__(self, cfg: BadSampleConfig, output_dir: str | Path | None = None):
        self.cfg = cfg
        self.log_path = Path(output_dir) / BAD_SAMPLES_FILE if output_dir is not None else None
        self.window: deque[tuple[int, int]] = deque()  # (samples seen, bad) per step
        self.total_bad = self.total_seen = 0
        self.examples: list[str] = []

    def record(self, accelerator: Any, skipped: list[str], samples: int, step: int = 0) -> int:
        counts = torch.tensor([len(skipped), samples], device=accelerator.device, dtype=torch.float64)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, "sum")
        bad, good = int(counts[0].item()), int(counts[1].item())
        if bad:  # every rank knows (the counts were summed), so every rank takes part in the gather
            self.name(accelerator, skipped, step)
        self.total_bad += bad
        self.total_seen += good + bad
        self.examples = (self.examples + skipped)[-5:]
        self.window.append((good + bad, bad))
        while len(self.window) > 1 and sum(n for n, _ in self.window) - self.window[0][0] >= self.cfg.window:
            self.window.popleft()
        seen, bad_in_window = sum(n for n, _ in self.window), sum(b for _, b in self.window)
        if seen >= self.cfg.window and bad_in_window / seen > self.cfg.max_bad_fraction:
            kinds = ", ".join(sorted({kind_of(e) for e in self.examples}))
            raise DataError(
                f"{bad_in_window} of the last {seen} samples failed to load ({kinds}), e.g. "
                f"{self.examples[-1] if self.examples else '?'}; data.bad_samples sets the budget"
            )
        return bad

    def name(self, accelerator: Any, skipped: list[str], step: int) -> None:
        """Each failed sample on the console and in bad_samples.jsonl (main process; reasons from every rank)."""
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        reasons = gather_object(list(skipped)) if accelerator.num_processes > 1 else list(skipped)
        if not accelerator.is_main_process:
            return
        for reason in reasons:
            tqdm.write(f"step {step + 1}: sample replaced: {reason}")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a", encoding="utf-8") as log:
                for reason in reasons:
                    log.write(json.dumps({"step": step + 1, "kind": kind_of(reason), "reason": reason}) + "\n")

    def check_run(self) -> None:
        """At the end of a run: a short run never finishes "successfully" over its budget (the window rule needs
        `window` samples first)."""
        if self.total_seen and self.total_bad / self.total_seen > self.cfg.max_bad_fraction:
            where = f"; they are listed in {self.log_path}" if self.log_path else ""
            raise DataError(
                f"{self.total_bad} of {self.total_seen} samples ({self.total_bad / self.total_seen:.1%}) failed to "
                f"load during training, over data.bad_samples.max_bad_fraction={self.cfg.max_bad_fraction:g}; the "
                f"trained model is saved, but fix or remove those files{where}"
            )


class NonFiniteGuard:
    """A NaN/inf loss or gradient norm skips its optimizer step (no update, no scheduler step); K in a row stop
    the run."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, 0, 0

    def is_finite(self, accelerator: Any, loss: torch.Tensor) -> bool:
        return not agree(accelerator, not bool(torch.isfinite(loss.detach()).all()))

    def skipped(self, step: int, what: str = "loss") -> None:
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingError(
                f"the {what} was NaN or infinite {self.in_a_row} times in a row at step {step}; "
                "stopped (the last checkpoint is intact). Lower train.learning_rate or look for bad "
                "samples; train.max_nonfinite_steps sets the limit"
            )

    def finite(self) -> None:
        self.in_a_row = 0


def check_finite_weights(accelerator: Any, trainable: list[torch.Tensor], step: int) -> None:
    """Never save (and so never call intact) weights that are NaN or infinite: they would replace good ones."""
    bad = torch.tensor(int(any(not torch.isfinite(p.detach()).all() for p in trainable)), device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "max")
    if bad.item():
        raise TrainingError(
            f"the trainable weights hold NaN or infinite values after step {step}; nothing was saved "
            "(earlier checkpoints are intact): lower train.learning_rate or set train.max_grad_norm"
        )
