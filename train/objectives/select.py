"""The objective a recipe names (`train.objective`), and the training examples and batches it needs."""

from __future__ import annotations

from typing import Any

from vidtune.data.collator import Collator
from vidtune.data.dataset import DataConfig, ExampleMaker
from vidtune.data.examples import ExampleBuilder
from vidtune.train.objectives.base import Objective
from vidtune.train.objectives.sft import SFTObjective
from vidtune.train.training.config import Recipe
from vidtune.train.training.loss import language_head, training_loss


def build_objective(recipe: Recipe, model: Any, autocast: Any, zero3: bool) -> Objective:
    """The loss the loop calls; under ZeRO-3 the model's own logits (its head is partitioned outside its forward)."""
    name = recipe.train.objective
    if name == "dpo":
        from vidtune.train.objectives.dpo import DPOObjective

        return DPOObjective(recipe.train.dpo, None if zero3 else language_head(model), autocast)
    return SFTObjective(training_loss(model, autocast, zero3=zero3))


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
    return ExampleMaker(builder, data, recipe.train.seed, train=True), collate
