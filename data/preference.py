"""Preference pairs (DPO): one decode of a row's media, two examples (chosen, rejected), one batch of both.

A preference row is its chosen conversation plus the rejected answer's text (data/formats.py `from_preference`).
The rejected conversation is the chosen one with its last assistant turn replaced; both are built from the same
decoded frames, and a micro-batch holds the chosen examples first, then the rejected ones in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vidtune.data.collator import Collator
from vidtune.data.conversation import DataError
from vidtune.data.dataset import ExampleMaker
from vidtune.data.examples import answer_replaced, with_time_instructions
from vidtune.data.packing import with_row_counts


def check_preference_rows(rejected: Sequence[str], at: Sequence[str]) -> None:
    """Every training row must be a pair: a corpus without rejected answers is a configuration error."""
    missing = [where for text, where in zip(rejected, at, strict=True) if not text]
    if missing:
        raise DataError(
            f"{missing[0]}: train.objective=dpo needs preference rows (a prompt with `chosen` and `rejected` "
            f"answers); {len(missing)} of {len(at)} rows have no rejected answer"
        )


class PairMaker(ExampleMaker):
    """Decodes a row's media once and builds its chosen and its rejected example from the same frames."""

    def _build(self, row: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        media, instructions = self.decode(row, rng)
        chosen = with_time_instructions(row["messages"], instructions)
        pair = {
            "chosen": self.builder.build(chosen, media),
            "rejected": self.builder.build(answer_replaced(chosen, row["rejected"]), media),
        }
        # ExampleMaker.make checks the length of "input_ids": the longer of the two
        pair["input_ids"] = max(pair["chosen"]["input_ids"], pair["rejected"]["input_ids"], key=len)
        return pair


@dataclass
class PairCollator:
    """Chosen examples first, then the rejected ones, padded into one batch; its counts are pairs."""

    inner: Collator

    def __call__(self, pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        examples = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        return with_row_counts(self.inner(examples), pairs, samples=len(pairs))


def pair_count(batch: dict[str, Any]) -> torch.Tensor:
    return torch.full((), len(batch["input_ids"]) // 2)
