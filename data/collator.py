"""Pad examples into a batch.

Text is padded (right for training, left for generation); pixels are never padded into fake frames: the model
family batches the visual tensors its own way (LLaVA-NeXT-Video: all frames of a batch in one tensor), so clips
with different frame counts, images and text-only samples mix freely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vidtune.data.examples import IGNORE_INDEX
from vidtune.data.families import ModelFamily
from vidtune.data.packing import pack

PADDING_SIDES = ("right", "left")
# Batch keys the collator adds for the training loss (not model inputs): the flat positions (row * width + column)
# whose next token is a label, row-major, and those labels (train/training/loss.py).
LABEL_POSITIONS, LABEL_TARGETS = "label_positions", "label_targets"


def label_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, T) labels on the host -> the flat positions whose next token is a label (N,) and those labels (N,):
    position t predicts label t + 1, the shift transformers' causal-LM loss makes. Computed here, the device side
    indexes with a size the host knows (a boolean mask there would read its count back from the device)."""
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    positions = (next_labels != IGNORE_INDEX).nonzero().flatten()
    return {LABEL_POSITIONS: positions, LABEL_TARGETS: next_labels[positions]}


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
    family: ModelFamily | None = None  # batches the visual tensors; None for text-only batches
    packing: bool = False  # pack training samples instead of padding them (packing.py)
    pack_max_length: int | None = None  # packed rows of up to this many tokens; None: one row, no padding at all
    model_config: Any = None  # the model's config, for position ids that need it (multimodal RoPE) when packing
    # Add the training loss's label positions and targets (train/training/loss.py label_positions), computed here on
    # the host so the loss never reads a count back from the device. For the SFT loss only.
    loss_positions: bool = False

    def __post_init__(self) -> None:
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be right or left, got {self.padding_side!r}")
        if self.pack_max_length is not None and not self.packing:
            raise ValueError("pack_max_length is the packed row length: set packing=True with it")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.packed(examples) if self.packing else self.padded(examples)
        # Samples replaced because they failed to load (reasons), for the loop's bad-sample budget.
        skipped = [reason for ex in examples for reason in ex.get("skipped", [])]
        if skipped:
            batch["skipped"] = skipped
        if self.loss_positions and "labels" in batch:
            batch.update(label_positions(batch["labels"]))
        return batch

    def packed(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pack(examples, self.pad_token_id, self.family, self.pack_max_length, self.model_config)

    def padded(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
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
        if self.family is not None:
            for key in self.family.token_keys:  # per-token tensors (Qwen's mm_token_type_ids) line up with the text
                if all(key in ex for ex in examples):
                    batch[key] = pad_sequences([ex[key] for ex in examples], 0, self.padding_side, width)
            batch.update(self.family.batch_visuals(examples))
            self.family.finish_batch(batch, examples, self.padding_side)
        elif any(key not in ("input_ids", "attention_mask", "labels", "skipped") for ex in examples for key in ex):
            raise ValueError("these examples carry visual inputs: give the Collator their model family")
        return batch
