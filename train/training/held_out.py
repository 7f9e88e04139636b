"""Held-out scores during training: the eval loss over the held-out split and generation-based metrics, both
stopping between batches when SIGTERM/SIGINT arrives; and `to_device`, how every batch reaches the model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vidtune.data.examples import ExampleBuilder
from vidtune.train.evaluation.tasks import in_training_eval
from vidtune.train.generation.infer import InferenceModel

if TYPE_CHECKING:
    from vidtune.train.training.loop import Run


def to_device(run: Run, batch: dict[str, Any]) -> dict[str, Any]:
    """Streamed batches are not placed by Accelerate; uint8 pixels are normalised once there (family)."""
    device = run.accelerator.device
    # from pinned memory on a GPU; host values (an objective's texts) stay
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return run.family.normalize_pixels(moved, run.processor)


@torch.no_grad()
def evaluate(run: Run) -> float | None:
    """Token-mean loss over the held-out split (per-sample sums, so padding and duplicates do not bias it); None
    when SIGTERM/SIGINT arrived: checked between batches, since a long evaluation outlasts a preemption's grace
    period (the caller then checkpoints and stops)."""
    acc, model = run.accelerator, run.model
    model.eval()
    loss_sum, token_sum = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
    for batch in run.eval_loader:
        if run.stop.requested(acc):  # every rank has the same number of eval batches (Accelerate evens them)
            model.train()
            return None
        batch.pop("skipped", None)
        batch = to_device(run, batch)
        run.lockstep.prepare(batch)  # ranks must run the vision paths alike in eval too
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        run.lockstep.take_term()
        labels = batch["labels"][:, 1:]
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        sample_loss, sample_tokens = acc.gather_for_metrics((per_token.sum(1), (labels != -100).sum(1)))
        loss_sum += sample_loss.sum()
        token_sum += sample_tokens.sum()
    model.train()
    return (loss_sum / token_sum.clamp(min=1)).item()


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
    except EvalAbandoned:
        model.train()
        return None
