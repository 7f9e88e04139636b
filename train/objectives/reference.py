"""The reference model DPO's log-ratios and GRPO's KL are measured against: the model the stage starts from.

Under LoRA it is the policy itself with its adapter disabled: no second copy. Under full fine-tuning every weight
trains, so the start is kept as a frozen copy, loaded from the same checkpoint as the policy. Under ZeRO-3 DeepSpeed
partitions it as it partitions the policy (an inference engine of the run's own config, as TRL's prepare_deepspeed
builds one), and it gets its own vision lockstep, so ranks whose micro-batches differ in modality never wait on
each other in its all-gathers. One process, DDP and ZeRO-1/2: a whole copy on the device, without gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vidtune.train.objectives.base import adapter_disabled


class AdapterOff:
    """LoRA: the policy with its adapter disabled, read through the policy's own language head."""

    def __init__(self, head: torch.nn.Module | None):
        self.head = head

    @contextmanager
    def __call__(self, policy: Any, batch: dict[str, Any]) -> Iterator[tuple[Any, torch.nn.Module | None]]:
        with adapter_disabled(policy):
            yield policy, self.head


class FrozenCopy:
    """Full fine-tuning: a frozen copy of the starting model (`model`, prepared for the run's engine)."""

    def __init__(self, model: Any, head: torch.nn.Module | None, lockstep: Any):
        self.model, self.head, self.lockstep = model, head, lockstep

    @contextmanager
    def __call__(self, policy: Any, batch: dict[str, Any]) -> Iterator[tuple[Any, torch.nn.Module | None]]:
        self.lockstep.prepare(batch)  # (ZeRO-3) the same vision paths on every rank, blank where a rank has none
        with torch.no_grad():
            yield self.model, self.head


def needs_frozen_copy(recipe: Any) -> bool:
    """Whether the objective compares with its start (DPO always, GRPO with a KL) and nothing else keeps it."""
    t = recipe.train
    compares = t.objective == "dpo" or (t.objective == "grpo" and t.grpo.beta > 0)
    return compares and recipe.finetune.mode == "full"


def refuse_unsharded_copy(recipe: Any, accelerator: Any) -> None:
    """Said before any model loads: FSDP would leave the frozen copy whole on every rank."""
    from vidtune.train.training.config import RecipeError
    from vidtune.train.training.distributed import is_fsdp

    if needs_frozen_copy(recipe) and is_fsdp(accelerator):
        raise RecipeError(
            f"train.objective={recipe.train.objective} with finetune.mode=full under FSDP: its frozen reference "
            "model is not sharded by FSDP yet; launch with launch/accelerate/zero3.yaml, or use finetune.mode=lora"
        )


def frozen_copy(recipe: Any, accelerator: Any, family: Any, processor: Any) -> FrozenCopy:
    """The starting model again, frozen, on the run's engine (module docstring)."""
    from vidtune.train.training.distributed import VisionLockstep, zero_stage
    from vidtune.train.training.loss import language_head
    from vidtune.train.training.model import load_model

    zero3 = zero_stage(accelerator) == 3
    # under ZeRO-3 it loads inside deepspeed.zero.Init, each rank holding its partition (model.py)
    model, _ = load_model(recipe.model, init_device=None if zero3 else accelerator.device)
    model.requires_grad_(False)
    model.eval()
    if zero3:
        model = inference_engine(model, accelerator)
    else:
        model.to(accelerator.device)
    head = None if zero3 else language_head(model)
    return FrozenCopy(model, head, VisionLockstep(accelerator, family, processor, model))


def inference_engine(model: Any, accelerator: Any) -> Any:
    """A DeepSpeed engine for a model that never trains: the run's ZeRO-3 config without optimizer or scheduler,
    so its weights stay partitioned and are gathered layer by layer in its forward, as the policy's are."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
