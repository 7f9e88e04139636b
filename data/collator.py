"""Pad examples into a batch.

Text is padded (right for training, left for generation); pixels are never padded into fake frames. The model
fills `<video>` token positions with frame features in order, so all videos of a batch travel as one
(1, sum of frames, C, H, W) tensor: clips with different frame counts mix freely, and a text-only sample simply
adds no frames. Images travel the same way: every image's anyres patches stacked into one (sum of patches, C, H, W)
tensor, which the model splits back per image from `image_sizes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vidtune.data.examples import IGNORE_INDEX

PADDING_SIDES = ("right", "left")


def pad_sequences(sequences: Sequence[torch.Tensor], value: int, side: str, width: int) -> torch.Tensor:
    out = torch.full((len(sequences), width), value, dtype=sequences[0].dtype)
    for row, seq in enumerate(sequences):
        if side == "right":
            out[row, : len(seq)] = seq
        else:
            out[row, width - len(seq) :] = seq
    return out


@dataclass
class Collator:
    """A DataLoader collate_fn (picklable, so it works in worker processes)."""

    pad_token_id: int
    padding_side: str = "right"  # right for training; left for batched generation
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be right or left, got {self.padding_side!r}")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        input_ids = [ex["input_ids"] for ex in examples]
        width = max(len(ids) for ids in input_ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ones = [torch.ones(len(ids), dtype=torch.long) for ids in input_ids]
        batch: dict[str, Any] = {
            "input_ids": pad_sequences(input_ids, self.pad_token_id, self.padding_side, width),
            "attention_mask": pad_sequences(ones, 0, self.padding_side, width),
        }
        if all("labels" in ex for ex in examples):
            batch["labels"] = pad_sequences([ex["labels"] for ex in examples], IGNORE_INDEX, self.padding_side, width)
        videos = [ex["pixel_values_videos"] for ex in examples if "pixel_values_videos" in ex]
        if videos:
            batch["pixel_values_videos"] = torch.cat(videos).unsqueeze(0)
        # Samples replaced because they failed to load (reasons), for the loop's bad-sample budget.
        skipped = [reason for ex in examples for reason in ex.get("skipped", [])]
        if skipped:
            batch["skipped"] = skipped
        if any("pixel_values" in ex for ex in examples):
            batch["pixel_values"] = torch.cat([ex["pixel_values"] for ex in examples if "pixel_values" in ex])
            batch["image_sizes"] = torch.cat([ex["image_sizes"] for ex in examples if "image_sizes" in ex])
        return batch
