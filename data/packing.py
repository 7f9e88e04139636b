"""Padding-free batches: the samples of a micro-batch packed into as few rows of up to max_length tokens as fit.

Exactly the samples the micro-batch would hold unpacked (so losses compare step by step), placed first-fit
decreasing. Each sample's position ids restart at 0, and no attention mask is sent: transformers then derives a
block-diagonal causal mask from the restarts (masking_utils.find_packed_sequence_indices; flash-attention varlen
on a GPU, sdpa/eager masks on a CPU), so attention never crosses samples. A sample's first token is never a label
(its BOS or prompt), so the shifted loss never scores one sample's token from another's context. Rows are padded
to one width with a padding segment of its own (positions restarting at 0, labels ignored).

The family batches the visual tensors in the order samples sit in the rows (row by row), the order the model
fills their placeholders. (Families with multimodal RoPE — Qwen2.5-VL, Qwen3-VL — need their per-sample 3-D
position ids here; packing is refused for them until they provide those.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vidtune.data.examples import IGNORE_INDEX
from vidtune.data.families import ModelFamily

# Batch keys that are counts for the loop, not model inputs (popped before the forward).
NUM_SAMPLES, NUM_TOKENS = "num_samples", "num_tokens"


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` (a longer item gets a bin of its own)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
        bins[target].append(index)
        room[target] -= lengths[index]
    return bins


def pack(examples: Sequence[dict[str, Any]], max_length: int, pad_token_id: int, family: ModelFamily | None):
    """A packed batch: input_ids, labels, position_ids (rows, width), the family's visual tensors, and the counts
    of samples and real tokens (for the loop's metrics)."""
    rows = first_fit_decreasing([len(ex["input_ids"]) for ex in examples], max_length)
    ordered = [examples[i] for row in rows for i in row]  # the order samples sit in the rows
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids = examples[i]["input_ids"]
            end = start + len(ids)
            input_ids[r, start:end] = ids
            labels[r, start:end] = examples[i]["labels"]
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # padding: a segment of its own
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if family is not None:
        batch.update(family.batch_visuals(ordered))
    batch[NUM_SAMPLES] = len(examples)
    batch[NUM_TOKENS] = sum(len(ex["input_ids"]) for ex in examples)
    return batch


def pop_counts(batch: dict[str, Any]) -> tuple[int, int | torch.Tensor]:
    """(samples, real tokens) of a packed or padded micro-batch; a packed one's counts leave the batch. A padded
    batch's token count stays a tensor where the mask is (reading it on the host would wait for the device)."""
    if NUM_SAMPLES in batch:
        return int(batch.pop(NUM_SAMPLES)), int(batch.pop(NUM_TOKENS))
    return len(batch["input_ids"]), batch["attention_mask"].sum()
