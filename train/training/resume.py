"""Resuming a run from its output folder: the newest checkpoint that verifies and loads, refused when it does not
fit this run, with the settings a user changes on purpose (learning rate, weight decay) applied over what
Accelerate's load_state restored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vidtune.train.training import outputs, tracking
from vidtune.train.training.checkpoint import (
    TRAINER_STATE,
    changed_settings,
    check_resume,
    checkpoint_problem,
    checkpoint_root,
    clean_leftovers,
    load_checkpoint,
    step_folders,
)
from vidtune.train.training.health import TrainingError

if TYPE_CHECKING:
    from vidtune.train.training.loop import Run


def resume(run: Run) -> None:
    """Continue from the newest checkpoint of the output folder that verifies (sha256 of every file) and loads,
    saying which newer ones were skipped and why; refused when it does not fit this run (its fingerprint)."""
    acc, output = run.accelerator, run.recipe.train.output_dir
    if acc.is_main_process and run.recipe.train.resume == "restart":  # asked for explicitly: start over
        shutil.rmtree(Path(output) / "checkpoints", ignore_errors=True)
        (Path(output) / outputs.METADATA).unlink(missing_ok=True)  # no longer finished until it finishes again
        tracking.truncate_metrics(output, 0)
    if acc.is_main_process:
        clean_leftovers(output, acc.print)
    acc.wait_for_everyone()
    tried = []
    for checkpoint in reversed(step_folders(output)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            saved = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
            check_fingerprint(run, saved, checkpoint)
            configured = optimizer_settings(run)
            problem = load_checkpoint(acc, checkpoint, outputs.load_state_kwargs(acc))
            if problem is None:
                apply_optimizer_settings(run, configured)
                run.state.load_state_dict(saved["state"])
                if acc.is_main_process:
                    tracking.truncate_metrics(output, run.state.step)
                return
            tried.append(checkpoint)
        acc.print(f"skipping {checkpoint}: {problem}")
    if tried:  # a failed load may have changed some weights: never train on from a half-loaded state
        raise TrainingError(
            f"no checkpoint in {checkpoint_root(output)} verifies and loads; move them away to start afresh"
        )


def check_fingerprint(run: Run, saved: dict[str, Any], checkpoint: Path) -> None:
    """Refuse what changes the math (unless forced); print the deliberate changes (learning rate, max_steps)."""
    force = run.recipe.train.resume == "force"
    changed = check_resume(saved["fingerprint"], run.fingerprint, str(checkpoint), force)
    settings = changed_settings(saved.get("settings", {}), run.recipe)
    note = (f" (forced despite: {'; '.join(changed)})" if changed else "") + (
        f" (changed: {', '.join(settings)})" if settings else ""
    )
    run.accelerator.print(f"resuming from {checkpoint}{note}")


def optimizer_settings(run: Run) -> list[tuple[float, float, float]]:
    """Each parameter group's base learning rate, weight decay and Adam epsilon as this run's recipe built them."""
    groups = run.optimizer.param_groups
    return [(group.get("initial_lr", group["lr"]), group["weight_decay"], group["eps"]) for group in groups]


def apply_optimizer_settings(run: Run, configured: list[tuple[float, float, float]]) -> None:
    """load_state restores the optimizer's parameter groups (learning rate, weight decay, epsilon) and the scheduler's
    base_lrs as they were saved, so a learning rate or weight decay changed for the resumed run would be announced
    and then ignored: put this run's values back. The current rate is rescaled, keeping the schedule's factor at
    the resumed step (every schedule here multiplies the base rate)."""
    scheduler = getattr(run.scheduler, "scheduler", run.scheduler)  # the torch scheduler inside Accelerate's
    groups = run.optimizer.param_groups
    for index, (group, (base_lr, weight_decay, epsilon)) in enumerate(zip(groups, configured, strict=True)):
        saved_base = scheduler.base_lrs[index]
        group["lr"] = group["lr"] * base_lr / saved_base if saved_base else base_lr
        group["initial_lr"] = scheduler.base_lrs[index] = base_lr
        group["weight_decay"], group["eps"] = weight_decay, epsilon
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports for the next step
