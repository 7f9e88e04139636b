"""Packing throughput on the CPU: real tokens/s of a training forward + backward through vidtune's collator and loss
(the chunked cross-entropy the loop uses), length-grouped padded micro-batches against the same micro-batches packed
(train.packing, data/packing.py) in both layouts: first-fit rows of data.max_length (what sdpa/eager get) and one
row (what flash-attention varlen gets; here the row runs through sdpa's dense mask, the CPU having no varlen kernel).

The tiny model of a family, on a mix shaped like padding_efficiency.py's, scaled to it: half clips (2-16 frames,
4 tokens each on the tiny LLaVA-NeXT-Video), a quarter images, a quarter text, answers of 2-120 words (log-normal).
Micro-batches come from the loop's length-grouped sampler; every method runs every micro-batch once per round,
interleaved (benchmarks/common.py), and ratios are taken per round.

Run:  python benchmarks/packing_throughput.py [--samples 64] [--batch-size 8] [--rounds 5] [--max-length 1024]
      [--family llava_next_video]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, rates, speedup

from vidtune.data.collator import Collator
from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.dataset import EpochBatchSampler, load_media
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families import family_for
from vidtune.data.video import SamplingConfig
from vidtune.train.demo.clips import write_color_clip
from vidtune.train.demo.tiny_model import build_tiny_model
from vidtune.train.training.loss import ChunkedLoss, language_head
from vidtune.train.training.model import load_processor, model_class

WORDS = ["red", "green", "blue", "yellow", "first", "last", "then", "the", "clip", "shows", "a", "colour", "to"]
COLORS = ["red", "green", "blue", "yellow"]


def corpus(root: Path, count: int, seed: int) -> list[tuple[list, SamplingConfig]]:
    """(messages, sampling) per sample: clips of 2-16 frames, images, text; answers of log-normal length."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    clips = [write_color_clip(root / f"clip{n}.mp4", COLORS[:n], seed=n) for n in (1, 2, 4)]  # 8, 16, 32 frames
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "image.png")
    samples = []
    for _ in range(count):
        answer = " ".join(rng.choice(WORDS, size=int(np.clip(rng.lognormal(np.log(12), 0.9), 2, 120))))
        kind = rng.choice(3, p=[0.5, 0.25, 0.25])
        frames = int(rng.choice([2, 4, 8, 16]))
        media = [media_part("video", str(clips[frames // 8 if frames >= 8 else 0]))] if kind == 0 else []
        media += [media_part("image", str(root / "image.png"))] if kind == 1 else []
        chat = [message("user", [*media, text_part("Describe it.")]), message("assistant", [text_part(answer)])]
        samples.append((chat, SamplingConfig(frames)))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=1024, help="packed row length for sdpa (data.max_length)")
    parser.add_argument("--family", default="llava_next_video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    family = family_for(args.family)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_tiny_model(root / "model", family=args.family)
        processor = load_processor(str(model_dir), family)
        model = model_class(family).from_pretrained(model_dir).train()
        family.prepare_model(model)
        builder = ExampleBuilder(processor, family)
        examples = [
            builder.build(chat, load_media(chat, sampling, False, None)[0])
            for chat, sampling in corpus(root, args.samples, args.seed)
        ]
    lengths = [len(ex["input_ids"]) for ex in examples]
    sampler = EpochBatchSampler(lengths, args.batch_size, args.seed, group_by_length=True)
    micro_batches = [[examples[row] for _, row in batch] for batch in sampler]
    pad = processor.tokenizer.pad_token_id
    collators = {
        "grouped, padded": Collator(pad, family=family),
        f"packed, rows of {args.max_length}": Collator(
            pad, family=family, packing=True, pack_max_length=args.max_length, model_config=model.config
        ),
        "packed, one row": Collator(pad, family=family, packing=True, model_config=model.config),
    }
    loss = ChunkedLoss(language_head(model))

    def epoch(collate: Collator) -> None:
        for batch in micro_batches:
            inputs = {k: v for k, v in collate(batch).items() if k not in ("num_samples", "num_tokens")}
            model.zero_grad(set_to_none=True)
            loss(model, inputs).backward()

    seconds = interleaved(
        {name: lambda c=c: epoch(c) for name, c in collators.items()}, args.rounds, args.warmup_rounds
    )
    tokens = sum(lengths)
    print(
        f"packing throughput, tiny {args.family}, {args.samples} samples ({tokens} tokens, lengths "
        f"{min(lengths)}-{max(lengths)}), batch {args.batch_size}, {args.rounds} rounds, {machine()}"
    )
    print("  method                       real tokens/s (min/median/max)   x grouped (per round)   real/padded")
    for name, collate in collators.items():
        ratio = speedup(seconds, name, "grouped, padded").format(2, "x")
        padded = sum(collate(batch)["input_ids"].numel() for batch in micro_batches)
        print(f"  {name:<28} {rates(seconds[name], tokens).format(0):<32} {ratio:<23} {tokens / padded:.3f}")
    print(
        f"re-run: python benchmarks/packing_throughput.py --samples {args.samples} --batch-size {args.batch_size} "
        f"--rounds {args.rounds} --warmup-rounds {args.warmup_rounds} --max-length {args.max_length} "
        f"--family {args.family} --seed {args.seed}"
    )


if __name__ == "__main__":
    main()
