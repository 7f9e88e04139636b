"""The objective a recipe names (`train.objective`), and the training examples and batches it needs."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from vidtune.data.collator import Collator
from vidtune.data.dataset import DataConfig, ExampleMaker
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families import ModelFamily
from vidtune.train.objectives.base import Objective
from vidtune.train.objectives.reference import frozen_copy, needs_frozen_copy
from vidtune.train.objectives.sft import SFTObjective
from vidtune.train.training.config import Recipe
from vidtune.train.training.loss import language_head, training_loss


def build_objective(
    recipe: Recipe, model: Any, accelerator: Accelerator, family: ModelFamily, processor: Any, zero3: bool
) -> Objective:
    """The loss the loop calls; under ZeRO-3 the model's own logits (its head is partitioned outside its forward)."""
    name, autocast = recipe.train.objective, accelerator.autocast
    head = None if zero3 else language_head(model)
    reference = None  # LoRA: the adapter disabled (reference.py)
    if needs_frozen_copy(recipe):
        accelerator.print("reference: a frozen copy of the starting model (finetune.mode=full)")
        reference = frozen_copy(recipe, accelerator, family, processor)
    if name == "dpo":
        from vidtune.train.objectives.dpo import DPOObjective

        return DPOObjective(recipe.train.dpo, head, autocast, reference)
    if name == "grpo":
        from vidtune.train.objectives.grpo import GRPOObjective

        stop_ids = family.stop_token_ids(processor.tokenizer)
        media_ids = [getattr(processor, f"{kind}_token_id", None) for kind in ("video", "image", "audio")]
        rollout = Rollout(accelerator, recipe.train.grpo, processor.tokenizer, stop_ids, zero3)
        rollout.suppressed = [i for i in media_ids if i is not None]
        return GRPOObjective(
            recipe.train.grpo, head, autocast, rollout, stop_ids, family.token_keys, recipe.data.bad_samples, reference
        )
    if recipe.train.sequence_parallel > 1:  # each rank of a group computes its slice of the sequence
        from vidtune.train.training.sequence_split import SequenceSplitLoss

        return SequenceSplitLoss(model, accelerator, family, processor.tokenizer.pad_token_id, autocast, zero3)
    return SFTObjective(training_loss(model, autocast, zero3=zero3))


class Rollout:
    """The policy's own sampled completions (N, C) for a batch of prompts, and their texts. Under ZeRO-3 with
    several ranks, generation runs with synced_gpus: a rank whose completions all ended keeps taking part in the
    forward passes (and their all-gathers) until every rank is done, so different lengths never hang a rank."""

    def __init__(self, accelerator: Accelerator, settings: Any, tokenizer: Any, stop_ids: list[int], zero3: bool):
        self.accelerator, self.settings, self.tokenizer, self.stop_ids = accelerator, settings, tokenizer, stop_ids
        self.synced = zero3 and accelerator.num_processes > 1
        # media placeholder ids are never sampled: one in a completion makes the update's forward look for
        # visual features it does not have ("Video features and video tokens do not match"), seen at temperature 1.3
        self.suppressed: list[int] = []

    @torch.no_grad()
    def __call__(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        from vidtune.train.objectives.grpo import completion_mask

        inner = self.accelerator.unwrap_model(model)
        inner.eval()  # no dropout while sampling
        try:
            output = inner.generate(
                **{k: v for k, v in batch.items() if k != "labels"},
                do_sample=True,
                temperature=self.settings.temperature,
                top_k=self.settings.top_k,
                top_p=1.0,
                max_new_tokens=self.settings.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.stop_ids,
                synced_gpus=self.synced,
                suppress_tokens=self.suppressed or None,
            )
        finally:
            inner.train()
        completions = output[:, batch["input_ids"].shape[1] :]
        mask = completion_mask(completions, self.stop_ids)
        texts = [
            self.tokenizer.decode(row[keep].tolist(), skip_special_tokens=True).strip()
            for row, keep in zip(completions, mask, strict=True)
        ]
        return completions, texts


def training_examples(
    recipe: Recipe, builder: ExampleBuilder, data: DataConfig, collate: Any, rows: Any
) -> tuple[ExampleMaker, Any]:
    """The example maker and collate function of the training set (evaluation always scores single examples)."""
    if recipe.train.objective == "dpo":
        from vidtune.data.preference import PairCollator, PairMaker, check_preference_rows

        if rows is not None:
            check_preference_rows(rows["rejected"], rows["at"])
        assert isinstance(collate, Collator)
        return PairMaker(builder, data, recipe.train.seed, train=True), PairCollator(collate)
    if recipe.train.objective == "grpo":
        from vidtune.data.rollouts import GroupCollator, PromptMaker

        assert isinstance(collate, Collator)
        maker = PromptMaker(builder, data, recipe.train.seed, train=True)
        maker.copies = 1 if recipe.train.grpo.decode_once else recipe.train.grpo.num_generations
        left = Collator(collate.pad_token_id, padding_side="left", family=collate.family)  # prompts, for generate
        return maker, GroupCollator(left, recipe.train.grpo.num_generations)
    return ExampleMaker(builder, data, recipe.train.seed, train=True), collate
