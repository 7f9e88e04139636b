"""Loop overhead: vidtune's training step against a bare PyTorch step doing the same math (forward, backward,
clipping, AdamW, scheduler), on the same tiny LLaVA-NeXT-Video with LoRA and the same pre-collated batches.
Data loading is left out of both, so what differs is vidtune's bookkeeping: the global token count, loss scaling,
the non-finite guard, bad-sample accounting and metrics. Steps alternate between the two, medians are compared.

Run:  python benchmarks/loop_overhead.py [--steps 150] [--batch-size 8] [--frames 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

from vidtune.data.collator import Collator
from vidtune.data.dataset import load_media
from vidtune.data.examples import ExampleBuilder
from vidtune.train.demo.corpus import write_demo_corpus
from vidtune.train.demo.tiny_model import build_tiny_model
from vidtune.train.training.config import load_recipe
from vidtune.train.training.loop import setup, train_step


def batches(run, corpus: Path, count: int, batch_size: int, frames: int) -> list[dict]:
    """Pre-collated batches of demo questions (decoded once, outside the timing)."""
    from vidtune.data.sources import SourceConfig, iter_conversations
    from vidtune.data.video import SamplingConfig

    rows = list(iter_conversations(SourceConfig(path=str(corpus / "questions_train.jsonl"))))
    builder = ExampleBuilder(run.processor, run.family)
    examples = []
    for row in rows[: count * batch_size]:
        media, _ = load_media(row["messages"], SamplingConfig(frames), False, None, shortest_edge=builder.frame_px)
        examples.append(builder.build(row["messages"], media))
    collate = Collator(run.processor.tokenizer.pad_token_id, family=run.family)
    return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def bare_step(model, optimizer, scheduler, batch, max_grad_norm: float) -> float:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_tiny_model(root / "model")
        corpus = write_demo_corpus(root / "corpus", num_train=max(24, args.batch_size * 6), num_eval=4)
        recipe = load_recipe(
            None,
            [
                f"model.name_or_path={model_dir}",
                f"data.sources=[{{path: {corpus / 'questions_train.jsonl'}}}]",
                "data.num_workers=0",
                f"data.sampling.num_frames={args.frames}",
                f"train.output_dir={root / 'run'}",
                f"train.max_steps={10 * args.steps}",
                f"train.batch_size={args.batch_size}",
                "logging.report_to=none",
                "finetune.lora.dropout=0",
            ],
        )
        run = setup(recipe)
        data = batches(run, corpus, 6, args.batch_size, args.frames)
        bare_model = copy.deepcopy(run.accelerator.unwrap_model(run.model)).train()
        trainable = [p for p in bare_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=recipe.train.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        for batch in data[:2]:  # warm up both
            train_step(run, [dict(batch)])
            bare_step(bare_model, optimizer, scheduler, batch, recipe.train.max_grad_norm)
        timings: dict[str, list[float]] = {"vidtune": [], "bare": []}
        for step in range(args.steps):
            batch = data[step % len(data)]
            for name in ("vidtune", "bare") if step % 2 else ("bare", "vidtune"):  # alternate the order
                started = time.perf_counter()
                if name == "vidtune":
                    train_step(run, [dict(batch)])
                else:
                    bare_step(bare_model, optimizer, scheduler, batch, recipe.train.max_grad_norm)
                timings[name].append(time.perf_counter() - started)
    ours, bare = statistics.median(timings["vidtune"]), statistics.median(timings["bare"])
    print(
        f"loop overhead, tiny LLaVA-NeXT-Video + LoRA, batch {args.batch_size} x {args.frames} frames, "
        f"{args.steps} steps each, {machine()}"
    )
    print(f"  bare PyTorch step  {1000 * bare:8.2f} ms (median)")
    print(f"  vidtune step       {1000 * ours:8.2f} ms (median)")
    print(f"  ratio              {ours / bare:8.3f}x")
    print(
        f"re-run: python benchmarks/loop_overhead.py --steps {args.steps} --batch-size {args.batch_size} "
        f"--frames {args.frames}"
    )


if __name__ == "__main__":
    main()
