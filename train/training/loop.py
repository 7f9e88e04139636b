"""The training loop, on Accelerate primitives: setup -> (resume) -> train -> save -> cleanup.

Loss is the mean over every label token of the global batch (all micro-batches of an optimizer step, all ranks):
each micro-batch backpropagates its summed token loss x (grad_accum x world) / (label tokens of the window),
which undoes Accelerate's /grad_accum and the data-parallel average. A plain per-micro-batch mean would weight a
short answer's tokens more than a long one's and change with the batch layout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vidtune.data.dataset import DropReport, EpochBatchSampler
from vidtune.data.families import ModelFamily
from vidtune.data.packing import pop_counts
from vidtune.data.quality import BadSampleConfig
from vidtune.train.evaluation.tasks import training_items
from vidtune.train.objectives.base import Objective
from vidtune.train.objectives.select import build_objective
from vidtune.train.training import outputs, tracking
from vidtune.train.training.build import (
    build_loaders,
    build_model,
    build_optimizer,
    refuse_unpackable_family,
    shut_down_workers,
    steps_per_epoch,
)
from vidtune.train.training.checkpoint import (
    TRAINER_STATE,
    TrainingState,
    fingerprint,
    retry_when_disk_full,
    run_settings,
    save_checkpoint,
    state_bytes,
)
from vidtune.train.training.config import Recipe, recipe_to_yaml
from vidtune.train.training.distributed import (
    VisionLockstep,
    is_deepspeed,
    make_accelerator,
    save_state_kwargs,
    weights_sharded,
)
from vidtune.train.training.flops import FlopCounter, flop_counter, peak_tflops, squared_lengths
from vidtune.train.training.health import (
    BadSampleMonitor,
    NonFiniteGuard,
    TrainingError,
    check_finite_weights,
    guard_update,
)
from vidtune.train.training.held_out import evaluate_at, to_device
from vidtune.train.training.model import format_audit
from vidtune.train.training.preemption import StopRequest, TrainingStopped
from vidtune.train.training.progress import TrainingBar
from vidtune.train.training.resume import resume
from vidtune.train.training.sharding import whole

STOP_CHECK_STEPS = 10  # several processes agree on a stop request at read points, at least this often


@dataclass
class Run:
    recipe: Recipe
    accelerator: Accelerator
    model: Any
    family: ModelFamily
    processor: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    sampler: EpochBatchSampler | None  # None for a streamed corpus
    state: TrainingState
    total_steps: int
    audit: dict[str, Any]
    drops: DropReport
    lockstep: VisionLockstep
    fingerprint: dict[str, Any]  # what a checkpoint of this run may only be resumed with
    flops: FlopCounter  # a step's model FLOPs, for TFLOPs and MFU (flops.py)
    loss: Objective  # (model, micro-batch) -> summed loss, and what it averages over (train/objectives/)
    stop: StopRequest = field(default_factory=StopRequest)
    nonfinite: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(5))
    bad_samples: BadSampleMonitor = field(default_factory=lambda: BadSampleMonitor(BadSampleConfig()))
    eval_items: list = field(default_factory=list)  # held-out rows for generation-based eval during training
    trainable: list = field(default_factory=list)  # the trainable weights, listed once (clipping walks them)
    lock: Any = None  # the output folder's lock (main process), released when the run ends


# ------------------------------------------------------------------------------------------------------- setup


def setup(recipe: Recipe) -> Run:
    accelerator = make_accelerator(recipe)
    # The output folder is locked before anything is written to it, and released if setup fails.
    lock = outputs.lock_output_dir(Path(recipe.train.output_dir)) if accelerator.is_main_process else None
    try:
        return build_run(recipe, accelerator, lock)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def build_run(recipe: Recipe, accelerator: Accelerator, lock: Any) -> Run:
    set_seed(recipe.train.seed)
    output_dir = Path(recipe.train.output_dir)
    refuse_unpackable_family(recipe)
    model, family, processor, audit = build_model(recipe, accelerator)
    if accelerator.is_main_process:
        outputs.write_audit(output_dir, audit)
        accelerator.print(format_audit(audit))
    train_loader, eval_loader, sampler, drops = build_loaders(recipe, processor, family, accelerator)
    if sampler is None:  # a stream has no length known up front
        accelerator.print("data: streamed; rows are measured and filtered as training reads them")
    else:
        accelerator.print(f"data: {drops.summary()}")
    total_steps = recipe.train.max_steps or math.ceil(
        recipe.train.num_epochs * steps_per_epoch(recipe, sampler, accelerator)
    )
    optimizer, scheduler = build_optimizer(recipe, model, total_steps, fused=not is_deepspeed(accelerator))
    zero3 = weights_sharded(accelerator)  # ZeRO-3 or sharded DTensors: no rank holds the whole language head
    flops = flop_counter(model, family, head_everywhere=zero3)  # the bare model's parts, hooks before wrapping
    # Map-style: Accelerate shards the batches across ranks (a stream is already split per rank). Prepared apart
    # from the model, so a sequence-parallel run keeps its own loader (sequence_split.py), not Accelerate's.
    if sampler is not None:
        train_loader = accelerator.prepare(train_loader)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    state = TrainingState()
    outputs.register_adapter_hooks(accelerator)
    rows = train_loader.dataset.rows if sampler is not None else None
    run_fingerprint = fingerprint(
        recipe, accelerator.num_processes, rows, getattr(processor, "chat_template", "") or ""
    )
    return Run(
        recipe,
        accelerator,
        model,
        family,
        processor,
        optimizer,
        scheduler,
        train_loader,
        eval_loader,
        sampler,
        state,
        total_steps,
        audit,
        drops,
        VisionLockstep(accelerator, family, processor, model),
        run_fingerprint,
        flops,
        nonfinite=NonFiniteGuard(recipe.train.max_nonfinite_steps),
        eval_items=training_items(recipe),
        trainable=[p for p in model.parameters() if p.requires_grad],
        bad_samples=BadSampleMonitor(recipe.data.bad_samples, recipe.train.output_dir),
        lock=lock,
        loss=build_objective(recipe, model, accelerator, family, processor, zero3),
    )


# ------------------------------------------------------------------------------------------------------- steps


def label_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Labels are shifted inside the loss: position 0 never counts.
    return (batch["labels"][:, 1:] != -100).sum()


def on_device(count: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A count as a 0-d device tensor without a host round trip (a tensor moves; an int becomes a kernel argument)."""
    return count.to(device) if isinstance(count, torch.Tensor) else torch.full((), count, device=device)


def forward_loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """The summed token loss of one micro-batch (train_step scales), never building full logits (loss.py)."""
    run.lockstep.prepare(batch)
    return run.loss(run.model, batch)


def micro_step(run: Run, index: int, batch: dict[str, Any], scale: torch.Tensor, last: bool) -> torch.Tensor | None:
    """Forward and backward of micro-batch `index` of the window; its summed loss. The window's last micro-batch
    reduces the gradients across ranks; the others accumulate locally. A non-finite loss goes through backward: the
    step's update is dropped on the device (guard_update), so the host never waits for the loss. Under DeepSpeed,
    whose engine steps inside backward, the loss is checked on the host first: None when it was not finite."""
    acc = run.accelerator
    acc.sync_gradients = last
    with acc.no_sync(run.model) if not acc.sync_gradients else nullcontext():
        summed = forward_loss(run, batch)
        if is_deepspeed(acc) and not run.nonfinite.is_finite(acc, summed):
            run.lockstep.take_term()
            return None
        acc.backward(summed * scale + run.lockstep.take_term())
    return summed.detach().float()


def train_step(run: Run, window: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer step over a window of micro-batches. Its figures (loss, samples, tokens, gradient norm) stay
    on the device until the loop's next read point; {"skipped": 1} when the host skipped the step (DeepSpeed's
    non-finite loss, fp16's loss scaler, an optimizer that cannot drop an update on the device)."""
    acc = run.accelerator
    run.flops.seen.take()  # forget the vision and audio work of evaluation since the last step
    skipped = [reason for batch in window for reason in batch.pop("skipped", [])]
    counts = [pop_counts(b) for b in window]  # (samples, real tokens): packed rows are not samples
    run.bad_samples.note(skipped, sum(samples for samples, _ in counts), run.state.step)
    local_tokens = sum(label_tokens(b) for b in window)
    local_units = sum(run.loss.units(b) for b in window)  # what the loss averages over: label tokens for SFT
    global_tokens = acc.reduce(torch.as_tensor(local_units, device=acc.device).float(), "sum").clamp(min=1)
    scale = run.recipe.train.grad_accum_steps * acc.num_processes / global_tokens
    loss_sum = torch.zeros((), device=acc.device)
    for index, batch in enumerate(window):
        batch = to_device(run, batch)
        summed = micro_step(run, index, batch, scale, last=index == len(window) - 1)
        if summed is None:
            return skip_step(run, "loss")
        loss_sum += summed
    grad_norm = clip_gradients(run)
    loss = acc.reduce(loss_sum, "sum") / global_tokens  # every rank's: not finite on all ranks when on any
    drop_on_device = not is_deepspeed(acc)  # DeepSpeed's engine owns the optimizer step
    scaler = acc.scaler  # fp16's loss scaler: its calibration is not a non-finite step (guard_update)
    if not guard_update(run.optimizer, run.nonfinite, loss, grad_norm, run.state.step + 1, drop_on_device, scaler):
        return skip_step(run, "loss or gradient norm")
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (read before the scheduler moves on)
    run.optimizer.step()
    if acc.optimizer_step_was_skipped:  # fp16: the loss scaler found inf/NaN gradients and skipped the update
        run.optimizer.zero_grad(set_to_none=True)
        return {"skipped": 1.0}
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # torch.full writes a count on the device (a kernel argument); torch.tensor(count, device=) would copy it
    # from host memory, which waits for the device's queue.
    local_samples = torch.full((), sum(samples for samples, _ in counts), device=acc.device)
    local_tokens_real = torch.stack([on_device(real, acc.device) for _, real in counts]).sum()
    tokens = acc.reduce(local_tokens_real, "sum")
    pairs = torch.stack([on_device(squared_lengths(b), acc.device) for b in window]).sum()
    local_flops = run.flops.language_flops(local_tokens_real, on_device(local_tokens, acc.device), pairs, len(window))
    return {
        "loss": loss,
        "lr": lr,
        "samples": acc.reduce(local_samples, "sum"),
        "tokens": tokens,
        "flops": acc.reduce(local_flops + run.flops.media_flops(), "sum"),
        "grad_norm": grad_norm if grad_norm is not None else float("nan"),
        "skipped_samples": len(skipped),
        **run.loss.figures(acc),
    }


def clip_gradients(run: Run) -> torch.Tensor | float | None:
    """Clip to max_grad_norm and return the norm. DeepSpeed clips inside its engine; otherwise torch does it
    directly on the trainable weights (Accelerate's clip_grad_norm_ probes the GPU driver on every call)."""
    acc, max_norm = run.accelerator, run.recipe.train.max_grad_norm
    if is_deepspeed(acc):
        return acc.clip_grad_norm_(run.model.parameters(), max_norm) if max_norm > 0 else None
    acc.unscale_gradients()  # fp16: true gradients before measuring them
    # Without clipping the norm is still measured: a non-finite one must skip the step.
    # (sharded weights: a DTensor norm, made whole for the logs and the non-finite check)
    return whole(torch.nn.utils.clip_grad_norm_(run.trainable, max_norm if max_norm > 0 else math.inf))


def skip_step(run: Run, what: str) -> dict[str, Any]:
    """Drop the window's gradients (its `what`, loss or gradient norm, was not finite): no optimizer step, no
    scheduler step."""
    acc = run.accelerator
    if is_deepspeed(acc):
        # DeepSpeed keeps reduced gradient partitions of the window's earlier micro-batches inside its engine,
        # with no public way to discard them: stop before its step rather than apply them.
        raise TrainingError(
            f"the {what} was NaN or infinite at step {run.state.step + 1}; under DeepSpeed vidtune "
            "stops before the optimizer step (the last checkpoint is intact)"
        )
    acc.sync_gradients = True  # Accelerate only zeroes gradients at a sync point
    run.optimizer.zero_grad(set_to_none=True)
    run.nonfinite.skipped(run.state.step + 1, what)
    return {"skipped": 1.0}


# -------------------------------------------------------------------------------------------------------- loop


def windows(loader: Any, size: int, progress: tracking.Progress) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Micro-batches grouped per optimizer step (the last window of an epoch may be shorter); the time the main
    process waits for them is added to progress.data_wait_s (a data-bound run shows it)."""
    batches = iter(loader)
    while True:
        started = time.perf_counter()
        window = list(islice(batches, size))
        progress.data_wait_s += time.perf_counter() - started
        if not window:
            return
        yield window


def train_loop(run: Run) -> dict[str, float]:
    acc, t, state = run.accelerator, run.recipe.train, run.state
    bar = TrainingBar(acc, run.total_steps, state.step, t.batch_size * t.grad_accum_steps * acc.num_processes)
    metrics: dict[str, float] = {}
    progress = tracking.Progress(acc.num_processes, peak_tflops(t.peak_tflops))
    unread: dict[str, Any] = {}  # the steps' figures since the last read point, still on the device
    run.model.train()  # once: evaluation puts it back in training mode itself
    while state.step < run.total_steps:
        if run.sampler is not None:  # the prepared loader also sets its sampler's epoch from its own pass counter
            run.sampler.set_epoch(state.epoch)  # when iterated (one process): a resumed pass sets that counter too
            run.train_loader.set_epoch(state.epoch)
        loader = run.train_loader
        if state.batches_in_epoch and run.sampler is None:  # a resumed stream skips rows without decoding them
            loader.dataset.skip_batches(state.batches_in_epoch)
        elif state.batches_in_epoch:  # resume mid-epoch: same order (seeded by epoch), skip what was consumed
            loader = acc.skip_first_batches(loader, state.batches_in_epoch)
        for window in windows(loader, t.grad_accum_steps, progress):
            step_metrics = train_step(run, window)
            state.batches_in_epoch += len(window)
            if not step_metrics.get("skipped"):  # a step the host skipped is no optimizer step
                state.step += 1
                add_unread(unread, step_metrics)
                bar.step()
                if is_read_point(run, state.step):
                    metrics = read_figures(run, unread, progress)
                    bar.show(metrics)
                after_step(run, metrics)
            stop = run.stop.requested(acc, agree=is_read_point(run, state.step))  # several ranks: agreed there
            if stop:
                read_figures(run, unread, progress)  # the checkpoint records every sample trained on
                raise TrainingStopped(stop, state.step, str(checkpoint(run)))
            if state.step >= run.total_steps:
                break
        if state.step < run.total_steps:  # the epoch ran out before the step budget
            state.epoch += 1
            state.batches_in_epoch = 0
    bar.close()
    return metrics


def add_unread(unread: dict[str, Any], step: dict[str, Any]) -> None:
    """Sum samples, tokens, FLOPs and failed samples over the unread steps; keep the latest step's loss, lr and norm."""
    for key in ("samples", "tokens", "flops", "skipped_samples"):
        step[key] = step[key] + unread.get(key, 0)
    unread.update(step)


def is_read_point(run: Run, step: int) -> bool:
    """Steps at which the host reads the device's figures: logging, evaluation, checkpoints, the last step, and in
    a multi-process run at least every STOP_CHECK_STEPS (where the ranks agree on a stop request). Every rank
    computes the same answer (the counts they read are summed over ranks)."""
    t, evals = run.recipe.train, run.recipe.eval
    periods = (
        STOP_CHECK_STEPS if run.accelerator.num_processes > 1 else 0,
        t.log_every_steps,
        t.eval_every_steps if run.eval_loader is not None else 0,
        evals.every_steps if run.eval_items else 0,
        t.save_every_steps,
    )
    return step == run.total_steps or any(every and step % every == 0 for every in periods)


def read_figures(run: Run, unread: dict[str, Any], progress: tracking.Progress) -> dict[str, float]:
    """The figures since the last read point, to the host (one sync): the run stops here if too many steps were
    not finite in a row or too many samples failed to load; the metrics of the latest step."""
    run.nonfinite.read()
    run.bad_samples.check(run.accelerator)
    if not unread:
        return {}
    keys = [k for k, v in unread.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([unread[k].detach().to(run.accelerator.device, torch.float64) for k in keys]).tolist()
    figures = {**unread, **dict(zip(keys, values, strict=True))}
    unread.clear()
    run.state.samples += int(figures["samples"])
    return progress.update(figures, run.state.epoch, run.nonfinite.total, run.bad_samples.total_bad)


def after_step(run: Run, metrics: dict[str, float]) -> None:
    """Logging, checkpoints, then periodic evaluation (after the checkpoint: a failed evaluation loses nothing)."""
    acc, t, step = run.accelerator, run.recipe.train, run.state.step
    if step % t.log_every_steps == 0 or step == run.total_steps:
        tracking.log(acc, metrics, step, t.output_dir)
    if t.save_every_steps and (step % t.save_every_steps == 0 or step == run.total_steps):
        checkpoint(run)  # the last step too: relaunching a finished run then has nothing left to do
    evaluate_at(run, metrics)  # a stop requested meanwhile: the loop checkpoints and stops right after


def checkpoint(run: Run) -> Path:
    check_finite_weights(run.accelerator, run.trainable, run.state.step)
    state = {"state": run.state.state_dict(), "fingerprint": run.fingerprint, "settings": run_settings(run.recipe)}
    if run.accelerator.is_main_process:
        tracking.write_loss_plot(run.recipe.train.output_dir)
    return save_checkpoint(
        run.accelerator,
        run.recipe.train.output_dir,
        run.state.step,
        run.recipe.train.keep_last_checkpoints,
        {"recipe.yaml": recipe_to_yaml(run.recipe), TRAINER_STATE: json.dumps(state, indent=1) + "\n"},
        retry_s=run.recipe.train.save_retry_s,
        needed_bytes=state_bytes(run.trainable),
        **save_state_kwargs(run.accelerator),
    )


def save_outputs(run: Run, metrics: dict[str, float]) -> None:
    """The final model, processor, recipe and vidtune.json into the output folder."""
    acc, recipe = run.accelerator, run.recipe
    frame_px = run.family.decode_edge_px(run.processor)
    if run.sampler is None:  # a stream's kept samples are the ones training read
        run.drops.kept = run.state.samples
    metadata = outputs.training_metadata(recipe, frame_px, run.drops, acc, run.state.step, metrics)
    check_finite_weights(acc, run.trainable, run.state.step)

    def save() -> None:
        outputs.save_final(acc, run.model, run.processor, recipe.train.output_dir, recipe, metadata)

    # The final save is often the only one (save_every_steps 0): a full disk must not lose the finished run.
    output = Path(recipe.train.output_dir)
    retry_when_disk_full(acc, save, output, state_bytes(run.trainable), recipe.train.save_retry_s)


def final_evaluation(run: Run, metrics: dict[str, Any]) -> None:
    """The saved final model gets scored too (its scores added to vidtune.json); a stop requested meanwhile ends
    the run with the model saved (TrainingStopped names the output folder)."""
    acc = run.accelerator
    if not evaluate_at(run, metrics, final=True):
        raise TrainingStopped(run.stop.requested(acc) or signal.SIGTERM, run.state.step, run.recipe.train.output_dir)
    if acc.is_main_process and any(key.startswith("eval/") for key in metrics):
        outputs.add_final_metrics(Path(run.recipe.train.output_dir), metrics)


def train(recipe: Recipe) -> Path:
    """Run a recipe end to end; returns the output folder (adapter or model, processor, recipe, metadata).
    A run that already finished in that folder is not trained again (train.resume=restart says to)."""
    finished = outputs.finished_message(recipe) if recipe.train.resume != "restart" else None
    if finished:
        if os.environ.get("RANK", "0") == "0":
            print(finished)
        return Path(recipe.train.output_dir)
    if recipe.hub.repo_id:
        from vidtune.train.publishing.export import hub_token

        hub_token()  # no token: say so now, not after hours of training
    run = setup(recipe)
    tracking.start(run.accelerator, recipe, run.total_steps)
    run.stop.install()
    try:
        resume(run)
        metrics = train_loop(run)
        save_outputs(run, metrics)  # first: what evaluation does next cannot lose the trained model
        final_evaluation(run, metrics)
        if run.accelerator.is_main_process:
            tracking.write_loss_plot(recipe.train.output_dir)
        run.bad_samples.check_run()  # after saving: the trained model is kept, but the run does not "succeed"
        if recipe.hub.repo_id and run.accelerator.is_main_process:
            from vidtune.train.publishing.export import push_finished_run

            run.accelerator.print(f"pushed to {push_finished_run(recipe)}")
    finally:
        shut_down_workers(run.train_loader, run.eval_loader)
        run.stop.uninstall()
        tracking.finish(run.accelerator)
        if run.lock is not None:
            run.lock.close()
    return Path(recipe.train.output_dir)
