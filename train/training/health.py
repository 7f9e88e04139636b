"""What the loop watches every step: samples that failed to load (against the bad-sample budget) and non-finite
losses (skipped steps). Every decision that must be the same on every rank is all-reduced first.

Neither makes the host wait for the accelerator on an ordinary step: the finiteness of a step is a flag on the
device that drops its update there (the optimizer's found_inf), failed-sample counts are host numbers kept per step;
both are read and judged at the loop's read points (logging steps, checkpoints, the end), one sync for all.
"""

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
    happen: the dataset gives up after max_bad_in_a_row consecutive replacements.)

    Each step only notes its rank's counts (host numbers); `check` sums them over ranks (one all-reduce for all the
    steps since the last check) and judges them step by step, at the loop's read points."""

    def __init__(self, cfg: BadSampleConfig, output_dir: str | Path | None = None):
        self.cfg = cfg
        self.log_path = Path(output_dir) / BAD_SAMPLES_FILE if output_dir is not None else None
        self.window: deque[tuple[int, int]] = deque()  # (samples seen, bad) per step
        self.total_bad = self.total_seen = 0
        self.examples: list[str] = []
        self.pending: list[tuple[int, list[str], int]] = []  # (step, this rank's failures, its good samples)

    def note(self, skipped: list[str], samples: int, step: int) -> None:
        """This rank's failed and good samples of a step (no device work: judged at the next check)."""
        self.pending.append((step, list(skipped), samples))

    def record(self, accelerator: Any, skipped: list[str], samples: int, step: int = 0) -> int:
        """Note a step and judge it at once; the failed samples of all ranks."""
        self.note(skipped, samples, step)
        return self.check(accelerator)

    def check(self, accelerator: Any) -> int:
        """Judge the steps noted since the last check (every rank calls it at the same step); failures counted."""
        pending, self.pending = self.pending, []
        if not pending:
            return 0
        counts = [(len(skipped), samples) for _, skipped, samples in pending]
        if accelerator.num_processes > 1:
            summed = accelerator.reduce(torch.tensor(counts, device=accelerator.device, dtype=torch.float64), "sum")
            counts = [(int(bad), int(good)) for bad, good in summed.tolist()]
        failed = 0
        for (step, skipped, _), (bad, good) in zip(pending, counts, strict=True):
            self.judge(accelerator, step, skipped, bad, good)
            failed += bad
        return failed

    def judge(self, accelerator: Any, step: int, skipped: list[str], bad: int, good: int) -> None:
        """One step's failures (summed over ranks) against the window and the budget."""
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
    """A NaN/inf loss or gradient norm drops its optimizer step's update; K in a row stop the run.

    On the device (`note`): the step's finiteness flag counts skipped steps, the current streak and the step at
    which a streak first reached K, with no host sync; `read` (at the loop's read points) takes them to the host and
    stops the run there. Under DeepSpeed, whose engine steps inside backward, the loss is checked on the host
    before backward instead (`is_finite`, `skipped`, `finite`)."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, 0, 0
        # Since the last read: [skipped steps, current streak, step at which a streak reached K (0: none)].
        self.on_device: torch.Tensor | None = None

    def note(self, finite: torch.Tensor, step: int) -> None:
        """Count the step's flag on the device (step: the 1-based step number, for the message)."""
        if self.on_device is None:
            self.on_device = torch.tensor([0.0, float(self.in_a_row), 0.0], device=finite.device)
        bad = (~finite).float()
        skipped, streak, stopped_at = self.on_device.unbind()
        streak = (streak + 1) * bad
        reached = (streak >= self.max_in_a_row) & (stopped_at == 0)
        self.on_device = torch.stack([skipped + bad, streak, torch.where(reached, float(step), stopped_at)])

    def read(self) -> None:
        """Take the device counts to the host (one sync); TrainingError when K in a row happened."""
        if self.on_device is None:
            return
        skipped, streak, stopped_at = (int(v) for v in self.on_device.tolist())
        self.on_device = None
        self.total += skipped
        self.in_a_row = streak
        if stopped_at:
            self.in_a_row = self.max_in_a_row
            self.skipped(stopped_at, "loss or gradient norm", counted=False)

    def is_finite(self, accelerator: Any, loss: torch.Tensor) -> bool:
        return not agree(accelerator, not bool(torch.isfinite(loss.detach()).all()))

    def skipped(self, step: int, what: str = "loss", counted: bool = True) -> None:
        if counted:
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


def guard_update(
    optimizer: Any,
    guard: NonFiniteGuard,
    loss: torch.Tensor,
    grad_norm: torch.Tensor | float | None,
    step: int,
    drop_on_device: bool,
    scaler: Any = None,
) -> bool:
    """Make a non-finite loss or gradient norm drop this step's update, without a host sync: the fused optimizer's
    found_inf flag (as torch's GradScaler uses it) leaves the weights, Adam's moments and its step count as they
    were, on the device; the step still counts as a step (its slot of the lr schedule passes unused), and the
    guard counts it there. False when the host must skip the step instead (DeepSpeed, an optimizer without
    found_inf: the host reads the flag, one sync).

    fp16 (`scaler`, torch's GradScaler): an overflowing gradient while the loss scale is above 1 is the scaler
    calibrating (from 65,536 it halves the scale and skips the step itself, often several times in a row), not a
    non-finite step: the guard counts only a non-finite loss, or an overflow the scale can no longer explain."""
    finite = torch.isfinite(loss)
    if grad_norm is not None:  # a finite loss can still overflow backward
        finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's
    calibrating = scaler is not None and scaler.is_enabled() and scaler.get_scale() > 1.0  # (fp16 syncs anyway)
    if drop_on_device and getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~finite).float()  # fp16: the loss scaler replaces it with its own (it also checks)
        guard.note(finite | (torch.isfinite(loss) & calibrating), step)
        return True
    if not bool(finite):
        return calibrating and bool(torch.isfinite(loss))  # calibrating: the scaler skips the step itself
    guard.finite()
    return True


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
