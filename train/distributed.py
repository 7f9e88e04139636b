"""Everything about processes and devices in one place: the Accelerator for a recipe, and what DeepSpeed needs."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from vidtune.train.config import Recipe


def resolve_mixed_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return name


def make_accelerator(recipe: Recipe) -> Accelerator:
    t = recipe.train
    return Accelerator(
        gradient_accumulation_steps=t.grad_accum_steps,
        mixed_precision=resolve_mixed_precision(t.mixed_precision),
        log_with="wandb" if recipe.logging.report_to == "wandb" else None,
        # The scheduler is stepped once per optimizer step, over exactly the steps the run makes (Accelerate would
        # otherwise step it once per process).
        step_scheduler_with_optimizer=False,
    )


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def save_state_kwargs(accelerator: Accelerator) -> dict[str, Any]:
    # DeepSpeed writes module states itself: keep frozen base weights out of every checkpoint.
    return {"exclude_frozen_parameters": True} if is_deepspeed(accelerator) else {}
