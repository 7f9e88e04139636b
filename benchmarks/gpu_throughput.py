"""Training throughput of `vidtune train` itself on the real 7B architecture: tokens/s, samples/s, TFLOPs per GPU,
MFU and peak memory at 8, 16 and 32 frames, packed and padded.

Each case is one `vidtune train` run (the CLI, Accelerate, DataLoader workers decoding real clips, the collator,
the loop) on a recipe whose model is LLaVA-NeXT-Video-7B or Qwen2.5-VL-7B built from its config.json with random
weights (`model.from_config`: nothing to download). Only the tokenizer and processor come from vidtune's tiny model
(no tokenizer can be downloaded here either): same vocabulary size and visual geometry as the 7B (336 px frames and
144 tokens per frame for LLaVA-NeXT-Video; 28 px per token, two frames per temporal patch for Qwen2.5-VL), fewer
distinct words. LoRA (the recipes' default targets), bf16, gradient checkpointing.

The figures are the run's own metrics (metrics.jsonl, written by the loop at every step): the model FLOPs of
train/training/flops.py, the peak from its GPU table or --peak-tflops. Rates are taken after --warmup steps (the
first steps pay for kernel selection and allocator growth). Peak memory: torch's allocator on a GPU, the process's
peak RSS on a CPU.

Run:  python benchmarks/gpu_throughput.py [--family llava_next_video] [--frames 8 16 32] [--steps 8]   (a GPU)
      python benchmarks/gpu_throughput.py --tiny                  (the tiny architecture on CPU: the same path)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

REPO = Path(__file__).resolve().parents[1]
SEVEN_B = {
    "llava_next_video": REPO / "tests" / "assets" / "llava_next_video_7b_config.json",
    "qwen2_5_vl": REPO / "tests" / "assets" / "qwen2_5_vl_7b_config.json",
}
# The config keys that name special tokens: the 7B's ids point into its own tokenizer, so they take the tiny
# tokenizer's ids (the tiny model's config.json has them).
TOKEN_KEYS = (
    "image_token_index",
    "video_token_index",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_token_id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
CLIP_SECONDS = 8  # 8 fps: 64 frames, so 32 sampled frames are all distinct


def model_folder(family: str, tiny: bool, root: Path) -> Path:
    """config.json (the 7B's, or the tiny one) and the tiny tokenizer and processor; no weights."""
    from vidtune.train.demo.tiny_model import build_tiny_model

    folder = build_tiny_model(root / "model", family=family)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    if tiny:
        return folder
    tiny_config = json.loads((folder / "config.json").read_text())
    config = json.loads(SEVEN_B[family].read_text())
    for section, tiny_section in ((config, tiny_config), (config.get("text_config", {}), tiny_config["text_config"])):
        for key in TOKEN_KEYS:
            if key in section:
                section[key] = tiny_section.get(key, tiny_config.get(key))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if family == "llava_next_video":  # its processor's frame geometry follows the config (336 px, 14 px patches)
        from transformers import AutoConfig, AutoTokenizer

        from vidtune.train.demo.tiny_model import tiny_processor

        tiny_processor(AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)).save_pretrained(
            folder
        )
    return folder


def write_corpus(root: Path, clips: int) -> Path:
    """Generated clips with questions whose answers run from 2 to 60 words (samples of mixed lengths, which is
    what packing is for)."""
    from vidtune.train.demo.clips import write_color_clip
    from vidtune.train.demo.corpus import color_pairs

    pairs = color_pairs()
    rows = []
    for index in range(clips):
        first, last = pairs[index % len(pairs)]
        name = f"videos/clip_{index:03d}.mp4"
        write_color_clip(root / name, [first, last], seconds_per_segment=CLIP_SECONDS / 2, fps=8, seed=index)
        words = 2 + (index * 29) % 59
        answer = " ".join([first, "then", last] * (words // 3 + 1))
        rows.append({"video": name, "question": "What happens in this clip?", "answer": answer})
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe_for(args: argparse.Namespace, model: Path, corpus: Path, output: Path, frames: int, packed: bool) -> Path:
    """The case's recipe: a YAML file `vidtune train` validates like any other (this process imports no model code,
    so the figures are the CLI's alone)."""
    settings = {
        "model.name_or_path": str(model),
        "model.from_config": True,
        "model.gradient_checkpointing": True,
        "data.sources": [{"path": str(corpus)}],
        "data.sampling.num_frames": frames,
        "data.sampling.fps": 8.0,
        "data.max_length": args.max_length,
        "train.output_dir": str(output),
        "train.max_steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.packing": packed,
        "train.log_every_steps": 1,
        "train.warmup_ratio": 0.0,
        "logging.report_to": "none",
    }
    if args.workers is not None:
        settings["data.num_workers"] = args.workers
    if args.peak_tflops:
        settings["train.peak_tflops"] = args.peak_tflops
    if args.tiny:
        settings.update({"model.dtype": "float32", "train.mixed_precision": "no"})
    elif args.family == "qwen2_5_vl":  # the tiny processor's frames are tiny: 448 x 448 px, 256 tokens per 2 frames
        settings.update({f"model.frame_limits.{k}_pixels_per_frame": 448 * 448 for k in ("min", "max")})
    recipe: dict = {}
    for dotted, value in settings.items():
        *sections, key = dotted.split(".")
        node = recipe
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    path = output.with_suffix(".yaml")
    path.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    return path


def after_warmup(metrics: list[dict], warmup: int) -> dict[str, float]:
    """Rates over the steps after `warmup` from the loop's cumulative ones: a rate x elapsed time is the running
    total, so the difference of two totals over the difference of two times is the rate in between."""
    steps = [m for m in metrics if "train/tokens_per_s" in m]
    if len(steps) <= warmup:
        sys.exit(f"{len(steps)} steps logged: --steps must exceed --warmup ({warmup})")
    last = steps[-1]
    start = steps[warmup - 1] if warmup else {"train/elapsed_s": 0.0}

    def rate(key: str) -> float:
        total = last[key] * last["train/elapsed_s"] - start.get(key, 0.0) * start["train/elapsed_s"]
        return total / (last["train/elapsed_s"] - start["train/elapsed_s"])

    figures = {key: rate(f"train/{key}") for key in ("tokens_per_s", "samples_per_s", "tflops_per_gpu")}
    peak = last["train/tflops_per_gpu"] / last["train/mfu"] if last.get("train/mfu") else None
    figures["mfu"] = figures["tflops_per_gpu"] / peak if peak else float("nan")
    figures["peak_memory_gb"] = last["train/peak_memory_gb"]
    return figures


def run_case(args: argparse.Namespace, model: Path, corpus: Path, root: Path, frames: int, packed: bool) -> dict:
    """One `vidtune train` run; its figures from metrics.jsonl."""
    output = root / f"run_{frames}f_{'packed' if packed else 'padded'}"
    recipe = recipe_for(args, model, corpus, output, frames, packed)
    result = subprocess.run(
        [sys.executable, "-m", "vidtune.train.cli", "train", str(recipe)],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if result.returncode != 0:
        sys.exit(f"vidtune train failed ({frames} frames, packing {packed}):\n{result.stderr[-3000:]}")
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return after_warmup([json.loads(line) for line in lines if line.strip()], args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(SEVEN_B), default="llava_next_video")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--packing", choices=("both", "on", "off"), default="both")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=5120)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the recipe default)")
    parser.add_argument("--tiny", action="store_true", help="the tiny architecture, float32 (CPU: the same path)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in flops.py's table")
    parser.add_argument("--model-dir", type=Path, help="a model folder to build from (its weights are not read)")
    parser.add_argument("--workdir", type=Path, help="keep the model folder, corpus and runs here")
    args = parser.parse_args()
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            sys.exit("no GPU: the 7B needs one (run with --tiny for the same path on the tiny architecture)")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_throughput_"))
    try:
        model = args.model_dir or model_folder(args.family, args.tiny, root)
        corpus = write_corpus(root / "corpus", args.clips)
        label = "tiny architecture, float32" if args.tiny else "7B architecture, random weights, bf16"
        print(f"{args.family}: {label}, LoRA, gradient checkpointing, batch {args.batch_size}; {machine()}")
        print(f"{'frames':>7}{'packing':>9}{'tokens/s':>11}{'samples/s':>11}{'TFLOPs/GPU':>12}{'MFU':>8}{'peak GB':>9}")
        packings = {"both": (False, True), "on": (True,), "off": (False,)}[args.packing]
        for frames in args.frames:
            for packed in packings:
                row = run_case(args, model, corpus, root, frames, packed)
                mfu = "n/a" if row["mfu"] != row["mfu"] else f"{row['mfu']:.1%}"
                print(
                    f"{frames:>7}{'on' if packed else 'off':>9}{row['tokens_per_s']:>11.1f}"
                    f"{row['samples_per_s']:>11.3f}{row['tflops_per_gpu']:>12.3g}{mfu:>8}{row['peak_memory_gb']:>9.2f}",
                    flush=True,
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"re-run: python benchmarks/gpu_throughput.py --family {args.family} --frames "
        f"{' '.join(map(str, args.frames))} --packing {args.packing} --steps {args.steps} --batch-size "
        f"{args.batch_size}" + (" --tiny" if args.tiny else "")
    )


if __name__ == "__main__":
    main()
