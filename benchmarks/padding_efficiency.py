"""Padding efficiency: real tokens / padded tokens in batches, with and without length grouping, on a realistic mix
of sample lengths for LLaVA-NeXT-Video-7B (144 tokens per frame, video tokens included):

  50%  videos sampled at 1 fps, capped at 32 frames: clips of 4 s to 3 min -> 4 to 32 frames -> 576 to 4,608 tokens
  30%  images (anyres, 1 to 5 crops of 576 tokens)
  20%  text-only turns
  plus prompt and answer text: log-normal, median 60 tokens, long tail to 1,500 (detailed captions).

Packed (train.packing: exactly each micro-batch's samples, data/packing.py) in the layout the attention picks:
one row of every sample with flash-attention varlen (no padding at all), first-fit-decreasing rows of
data.max_length tokens padded to the fullest row with sdpa/eager.

Run:  python benchmarks/padding_efficiency.py [--batch-size 8] [--samples 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

from vidtune.data.dataset import EpochBatchSampler
from vidtune.data.packing import first_fit_decreasing, pack_layout


def length_mix(count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    text = np.clip(rng.lognormal(np.log(60), 0.9, count), 8, 1500).astype(int)
    kind = rng.choice(3, size=count, p=[0.5, 0.3, 0.2])
    seconds = np.exp(rng.uniform(np.log(4), np.log(180), count))
    video = np.clip(np.floor(seconds), 4, 32).astype(int) * 144
    image = rng.integers(1, 6, count) * 576
    media = np.where(kind == 0, video, np.where(kind == 1, image, 0))
    return (text + media).tolist()


def efficiency(lengths: list[int], sampler: EpochBatchSampler) -> float:
    batches = [[lengths[row] for _, row in batch] for batch in sampler]
    return sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)


def packed_efficiency(lengths: list[int], sampler: EpochBatchSampler, row_length: int | None) -> tuple[float, float]:
    """Real / padded tokens with each micro-batch packed as data/packing.py packs it (rows of up to row_length
    tokens, or one row when None), and the mean rows per micro-batch."""
    real = padded = rows = 0
    for batch in sampler:
        sizes = [lengths[row] for _, row in batch]
        bins = first_fit_decreasing(sizes, row_length) if row_length else [list(range(len(sizes)))]
        fills = [sum(sizes[i] for i in b) for b in bins]
        real, padded, rows = real + sum(sizes), padded + max(fills) * len(fills), rows + len(fills)
    return real / padded, rows / len(sampler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=8192, help="packed row length (data.max_length)")
    args = parser.parse_args()
    lengths = length_mix(args.samples, args.seed)
    plain = efficiency(lengths, EpochBatchSampler(lengths, args.batch_size, args.seed))
    grouped = efficiency(lengths, EpochBatchSampler(lengths, args.batch_size, args.seed, group_by_length=True))
    print(
        f"padding efficiency (real / padded tokens), {args.samples} samples, batch {args.batch_size}, "
        f"lengths {min(lengths)}-{max(lengths)} (median {int(np.median(lengths))}), {machine()}"
    )
    print(f"  shuffled batches               {plain:.3f}")
    print(f"  length-grouped batches         {grouped:.3f}   (train.group_by_length, on by default)")
    # flash-attention varlen: one row per micro-batch (grouping changes nothing there); sdpa/eager: rows
    for attention, groupings in (
        ("flash_attention_2", [("", True)]),
        ("sdpa", [("shuffled", False), ("grouped", True)]),
    ):
        row_length = pack_layout(attention, args.max_length)
        for name, group in groupings:
            sampler = EpochBatchSampler(lengths, args.batch_size, args.seed, group_by_length=group)
            packed, rows = packed_efficiency(lengths, sampler, row_length)
            label = f"packed {name}, rows of {row_length}" if row_length else "packed, one row"
            print(f"  {label:<31}{packed:.3f}   (train.packing, {attention}; {rows:.2f} rows per batch)")
    print(
        f"re-run: python benchmarks/padding_efficiency.py --batch-size {args.batch_size} --samples {args.samples} "
        f"--seed {args.seed} --max-length {args.max_length}"
    )


if __name__ == "__main__":
    main()
