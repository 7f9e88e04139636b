"""GRPO rollouts: completions per second and where the wall time of training goes (generating the completions,
the update, waiting for decoded prompts), with each prompt's clip decoded once for its group of G completions
(vidtune's way) and once per completion (what peers do: ms-swift #4376), side by side.

The tiny LLaVA-NeXT-Video of the demo trains with train.objective=grpo on order questions about generated clips
of the chosen size and length (decode cost grows with them), one process, DataLoader decoding in the main process
(data.num_workers=0) so that the decode time shows as the data wait.

Run:  python benchmarks/grpo_rollouts.py [--steps 6] [--generations 8] [--batch-size 2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import generated_clip, machine

from vidtune.train.demo.tiny_model import build_tiny_model
from vidtune.train.objectives.select import Rollout
from vidtune.train.training.config import load_recipe
from vidtune.train.training.loop import train
from vidtune.train.training.tracking import read_metrics


def corpus(root: Path, seconds: float, count: int = 8) -> Path:
    """Order questions about `count` generated 640x360 clips of `seconds` each."""
    rows = []
    for index in range(count):
        video = generated_clip(root / f"clip{index}.mp4", seconds, height=360, width=640)
        rows.append({"video": video.name, "question": "Which color comes first?", "answer": "red"})
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(model: Path, questions: Path, output: Path, args: argparse.Namespace, decode_once: bool) -> dict[str, float]:
    generating = [0.0]
    original = Rollout.__call__

    def timed(self, model, batch):
        started = time.perf_counter()
        try:
            return original(self, model, batch)
        finally:
            generating[0] += time.perf_counter() - started

    Rollout.__call__ = timed  # type: ignore[method-assign]
    try:
        overrides = [
            f"model.name_or_path={model}",
            f"data.sources=[{{path: {questions}}}]",
            f"data.sampling.num_frames={args.frames}",
            "data.max_length=512",
            "data.num_workers=0",
            "data.frame_cache.dir=null",
            f"train.output_dir={output}",
            "train.objective=grpo",
            f"train.grpo.num_generations={args.generations}",
            f"train.grpo.max_new_tokens={args.max_new_tokens}",
            f"train.grpo.decode_once={decode_once}",
            f"train.batch_size={args.batch_size}",
            f"train.max_steps={args.steps}",
            f"train.log_every_steps={args.steps}",
            "logging.report_to=none",
        ]
        train(load_recipe(None, overrides))
    finally:
        Rollout.__call__ = original  # type: ignore[method-assign]
    last = read_metrics(output)[-1]
    elapsed, wait = last["train/elapsed_s"], last["train/data_wait_fraction"]
    rollouts = args.steps * args.batch_size * args.generations
    return {
        "rollouts_per_s": rollouts / elapsed,
        "generation": generating[0] / elapsed,
        "data_wait": wait,
        "update": 1 - wait - generating[0] / elapsed,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each generated 640x360 clip")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        (root / "clips").mkdir()
        questions = corpus(root / "clips", args.seconds)
        results = {
            "decode once per prompt": run(model, questions, root / "once", args, True),
            "decode per completion": run(model, questions, root / "each", args, False),
        }
    print(f"\nmachine: {machine()}")
    print(
        f"GRPO on the tiny LLaVA-NeXT-Video: {args.steps} steps x {args.batch_size} prompts x {args.generations} "
        f"completions (<= {args.max_new_tokens} tokens), {args.frames} frames of {args.seconds:g} s 640x360 clips"
    )
    print(f"{'':<26}{'rollouts/s':>12}{'generation':>12}{'update':>10}{'data wait':>11}{'seconds':>10}")
    for name, r in results.items():
        print(
            f"{name:<26}{r['rollouts_per_s']:>12.2f}{r['generation']:>12.0%}{r['update']:>10.0%}"
            f"{r['data_wait']:>11.0%}{r['seconds']:>10.1f}"
        )
    print(
        f"re-run: python benchmarks/grpo_rollouts.py --steps {args.steps} --generations {args.generations} "
        f"--batch-size {args.batch_size} --max-new-tokens {args.max_new_tokens} --frames {args.frames} "
        f"--seconds {args.seconds:g}"
    )


if __name__ == "__main__":
    main()
