"""Packed batches: the samples of a micro-batch side by side in rows, each with its own positions, no padding between.

Exactly the samples the micro-batch would hold unpacked (so losses compare step by step). Each sample keeps the
position ids it would have alone (the family's `packed_position_ids`: 0..L-1, or Qwen's multimodal RoPE rows), so
they restart per sample, and no attention mask is sent: transformers then derives where each sample starts from the
restarts (masking_utils.find_packed_sequence_indices for sdpa/eager masks; flash-attention varlen's cu_seqlens),
so attention never crosses samples. A sample's first token is never a label (its BOS or prompt), so the shifted
loss never scores one sample's token from another's context.

Two layouts, chosen by the attention (`pack_layout`):
- one row holding every sample, in batch order: no padding at all (padding-free, as transformers'
  DataCollatorWithFlattening). With flash-attention varlen each sample costs its own length squared, whatever the row;
  and it must be one row: transformers looks for restarts only in a batch of one row
  (modeling_flash_attention_utils._is_packed_sequence), so rows there would let attention cross samples.
- rows of up to max_length tokens, filled first-fit decreasing, padded to the fullest row with a segment of its own
  (positions restarting at 0, labels ignored). For sdpa/eager, which build a dense (row x row) mask and compute every
  block of it: one row of all samples would cost (sum of lengths)^2 there, more than the padding it saves.

The family batches the visual tensors in the order samples sit in the rows (row by row), the order the model fills
their placeholders.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vidtune.data.examples import IGNORE_INDEX
from vidtune.data.families import ModelFamily

# Batch keys that are counts for the loop, not model inputs (popped before the forward).
NUM_SAMPLES, NUM_TOKENS = "num_samples", "num_tokens"
# Where the rows' segments (samples, and a short row's padding) start in the flattened rows, and the longest: the
# varlen flash-attention kwargs (transformers' FlashAttentionKwargs), given so it does not derive them from the
# position ids in every layer (a device-to-host read each time). sdpa/eager ignore them (they read position_ids).
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


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


def pack_layout(attn_implementation: str, max_length: int) -> int | None:
    """The row length packing uses with this attention: None (one row of every sample, no padding) where attention
    runs per sample (flash-attention varlen), else max_length (a dense mask costs the row's length squared)."""
    return None if attn_implementation.startswith("flash_attention") else max_length


def pack(
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    family: ModelFamily | None,
    max_length: int | None = None,
    model_config: Any = None,
) -> dict[str, Any]:
    """A packed batch: input_ids, labels, position_ids ((R, W), or (rows, R, W) for multimodal RoPE), the family's
    per-token and visual tensors, and the counts of samples and real tokens (for the loop's metrics). One row of
    every sample when `max_length` is None, else first-fit decreasing rows of up to `max_length` tokens."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    rows = first_fit_decreasing(lengths, max_length) if max_length else [list(range(len(examples)))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    positions = [
        family.packed_position_ids(ex, model_config) if family else torch.arange(len(ex["input_ids"]))
        for ex in examples
    ]
    token_keys = [k for k in (family.token_keys if family else ()) if all(k in ex for ex in examples)]
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((*positions[0].shape[:-1], len(rows), width), dtype=torch.long)
    per_token = {k: torch.zeros((len(rows), width), dtype=examples[0][k].dtype) for k in token_keys}
    segments: list[int] = []  # segment lengths, row after row
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            segments.append(lengths[i])
            end = start + lengths[i]
            input_ids[r, start:end] = examples[i]["input_ids"]
            labels[r, start:end] = examples[i]["labels"]
            position_ids[..., r, start:end] = positions[i]
            for key in token_keys:
                per_token[key][r, start:end] = examples[i][key]
            start = end
        position_ids[..., r, start:] = torch.arange(width - start)  # padding: a segment of its own
        segments += [width - start] if width > start else []
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, **per_token}
    starts = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)  # flash-attn wants int32
    batch.update(zip(FLASH_KEYS, (starts, starts.clone(), max(segments), max(segments)), strict=True))
    if family is not None:
        batch.update(family.batch_visuals([examples[i] for row in rows for i in row]))
    batch[NUM_SAMPLES] = len(examples)
    batch[NUM_TOKENS] = sum(lengths)
    return batch


def with_row_counts(batch: dict[str, Any], rows: Sequence[dict[str, Any]], samples: int) -> dict[str, Any]:
    """A batch built from rows that each hold several examples (preference pairs, GRPO prompt groups): the rows'
    skip reasons (the loop's bad-sample budget), and its sample and real-token counts, as a packed batch has them."""
    skipped = [reason for row in rows for reason in row.get("skipped", [])]
    if skipped:
        batch["skipped"] = skipped
    batch[NUM_SAMPLES] = samples
    batch[NUM_TOKENS] = int(batch["attention_mask"].sum())
    return batch


def pop_counts(batch: dict[str, Any]) -> tuple[int, int | torch.Tensor]:
    """(samples, real tokens) of a packed or padded micro-batch; a packed one's counts leave the batch. A padded
    batch's token count stays a tensor where the mask is (reading it on the host would wait for the device)."""
    if NUM_SAMPLES in batch:
        return int(batch.pop(NUM_SAMPLES)), int(batch.pop(NUM_TOKENS))
    return len(batch["input_ids"]), batch["attention_mask"].sum()
