"""Held-out scores during training: the eval loss over the held-out split and generation-based metrics, both
stopping when SIGTERM/SIGINT arrives, run after the weights they score are saved and never fatal to them; and
`to_device`, how every batch reaches the model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vidtune.data.examples import ExampleBuilder
from vidtune.train.evaluation.tasks import in_training_eval
from vidtune.train.generation.infer import InferenceModel
from vidtune.train.training import tracking
from vidtune.train.training.loss import ChunkedLoss, model_inputs
from vidtune.train.training.preemption import StopInterrupt

if TYPE_CHECKING:
    from vidtune.train.training.loop import Run


def to_device(run: Run, batch: dict[str, Any]) -> dict[str, Any]:
    """Streamed batches are not placed by Accelerate; uint8 pixels are normalised once there (family)."""
    device = run.accelerator.device
    # From pinned memory on a GPU; host values (an objective's texts, packed attention's max_length_q/k) stay.
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return run.family.normalize_pixels(moved, run.processor)


def evaluate(run: Run) -> float | None:
    """Token-mean loss over the held-out split (per-sample sums, so padding and duplicates do not bias it), by the
    training loss's own path: logits only at label positions, a chunk at a time (loss.py), never the
    full-vocabulary fp32 logits that would not fit where training does. None when SIGTERM/SIGINT arrived: a
    single process is interrupted at once, several agree between batches (the caller then checkpoints and stops)."""
    acc, model = run.accelerator, run.model
    model.eval()
    loss_sum, token_sum = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
    try:
        with run.stop.interrupting(acc), torch.no_grad():
            for batch in run.eval_loader:
                if run.stop.requested(acc):  # every rank has the same number of eval batches (Accelerate evens them)
                    return None
                batch.pop("skipped", None)
                batch = to_device(run, batch)
                run.lockstep.prepare(batch)  # ranks must run the vision paths alike in eval too
                row_loss, row_tokens = row_losses(run.loss, model, batch)
                run.lockstep.take_term()
                sample_loss, sample_tokens = acc.gather_for_metrics((row_loss, row_tokens))
                loss_sum += sample_loss.sum()
                token_sum += sample_tokens.sum()
    except StopInterrupt:
        return None
    finally:
        model.train()
    return (loss_sum / token_sum.clamp(min=1)).item()


def row_losses(loss: Any, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss and label count of each row: chunked from hidden states (loss.ChunkedLoss), or from the
    model's logits where training uses the model's own loss too (ZeRO-3) or another objective than SFT."""
    loss = getattr(loss, "loss", loss)  # the SFT objective wraps the token loss (train/objectives/sft.py)
    if isinstance(loss, ChunkedLoss):
        return loss.per_row(model, batch)
    logits = model(**model_inputs(batch)).logits.float()
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    return per_token.sum(1), (labels != -100).sum(1)


class EvalAbandoned(Exception):
    """SIGTERM/SIGINT arrived during generation-based evaluation."""


def generation_eval(run: Run) -> dict[str, Any] | None:
    """Generated answers to the held-out items, scored (logged to the console and wandb by the main process); None
    when a stop was requested, checked before each batch (every rank runs the same number of batches)."""
    model = run.accelerator.unwrap_model(run.model)
    builder = ExampleBuilder(run.processor, run.family)
    d = run.recipe.data
    im = InferenceModel(model, run.processor, run.family, builder, d.sampling, d.time_instruction)

    def before(batch: dict[str, Any]) -> None:
        if run.stop.requested(run.accelerator):
            raise EvalAbandoned
        run.lockstep.prepare(batch)

    try:
        with run.stop.interrupting(run.accelerator):
            return in_training_eval(
                run.accelerator,
                im,
                run.eval_items,
                run.recipe.eval,
                run.recipe.train.batch_size,
                run.state.step,
                wandb_table=run.recipe.logging.report_to == "wandb",
                before=before,
            )
    except (EvalAbandoned, StopInterrupt):
        return None
    finally:
        model.train()


def evaluate_at(run: Run, metrics: dict[str, Any], final: bool = False) -> bool:
    """The evaluations due after this step (final: those this step did not run already), their scores logged and
    added to `metrics`. Called once the step's weights are saved (its checkpoint, the final save): an evaluation
    that fails (out of memory, a bad held-out row) costs its scores, said in one line, never the trained weights.
    False when a stop was requested during one (the caller checkpoints and stops)."""
    acc, step, t = run.accelerator, run.state.step, run.recipe.train
    loss_now, generation_now = (
        bool(every) and step % every == 0 for every in (t.eval_every_steps, run.recipe.eval.every_steps)
    )
    due = [
        ("eval loss", run.eval_loader is not None and loss_now != final),
        ("generation eval", bool(run.eval_items) and generation_now != final),
    ]
    for name, is_due in due:
        if not is_due:
            continue
        try:
            scores = evaluate(run) if name == "eval loss" else generation_eval(run)
        except Exception as err:  # reported; training goes on: its weights are saved, evaluation never changes them
            first_line = (str(err).strip().splitlines() or [""])[0][:300]
            acc.print(f"{name} after step {step} failed, its scores are skipped: {type(err).__name__}: {first_line}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an out-of-memory evaluation leaves its blocks cached
            continue
        if scores is None:
            return False
        scores = {"eval/loss": scores} if isinstance(scores, float) else scores
        metrics.update(scores)
        tracking.log(acc, scores, step, t.output_dir)
    return True
