"""Prompts for reward-based training (GRPO): each row's prompt (its conversation up to the last answer), decoded
once, repeated for the G completions of its group; the reference answer travels beside it for the rewards.

The G copies of a prompt in a batch share one decode: the frames are decoded and processed once per prompt (the
copies are the same tensors), for the rollouts and for the policy and reference passes of the update alike.
With decode_once off (the benchmark's comparison), each copy decodes the clip again, as peers' rollouts do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vidtune.data.collator import Collator
from vidtune.data.conversation import Message, assistant_texts
from vidtune.data.dataset import ExampleMaker
from vidtune.data.examples import IGNORE_INDEX, with_time_instructions
from vidtune.data.packing import with_row_counts

TEXT_KEYS = ("answer", "question", "at")  # per-row strings that stay on the host (the rewards read them)


def prompt_and_answer(messages: list[Message]) -> tuple[list[Message], str, str]:
    """The conversation up to its last assistant turn, that turn's text (the reference answer) and the last user
    turn's text (the question, which a choice reward reads its options from)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = messages[:last]
    question = next(
        (
            "".join(p["text"] or "" for p in m["content"] if p["type"] == "text")
            for m in reversed(prompt)
            if m["role"] == "user"
        ),
        "",
    )
    return prompt, assistant_texts(messages)[-1], question


class PromptMaker(ExampleMaker):
    """A row's prompt example (ready for generation), its reference answer and question, decoded once."""

    copies = 1  # decodes per prompt: 1 = decode once; G = decode again for every completion (benchmark only)

    def _build(self, row: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        prompt, answer, question = prompt_and_answer(row["messages"])
        examples = []
        for _ in range(self.copies):
            media, instructions = self.decode(row, rng)
            prompt_messages = with_time_instructions(prompt, instructions)
            examples.append(self.builder.build(prompt_messages, media, for_generation=True))
        example: dict[str, Any] = dict(examples[0])
        example.update(answer=answer, question=question, at=row["at"], decoded=examples)
        return example


@dataclass
class GroupCollator:
    """Each prompt repeated `group_size` times (consecutive rows), left-padded for generation; the rows' strings
    (answer, question, where) as lists beside the tensors; counts are completions."""

    inner: Collator
    group_size: int

    def __call__(self, prompts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        copies = []
        for prompt in prompts:
            decoded = prompt["decoded"]
            for k in range(self.group_size):
                copies.append(decoded[k % len(decoded)])
        batch = self.inner(copies)
        # No label yet: the completions get theirs after generation (the loop counts 0 label tokens up front).
        batch["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for key in TEXT_KEYS:
            batch[key] = [prompt[key] for prompt in prompts for _ in range(self.group_size)]
        return with_row_counts(batch, prompts, samples=len(copies))
